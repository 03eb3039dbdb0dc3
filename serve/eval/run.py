"""`zerolm eval`: one task over local data with a model loaded in this process.

    zerolm eval --model RUN_DIR --task bpb   --data TOKENS_DIR [--data NAME=notes.txt] [--limit 200]
                [--baseline-train TOKENS_DIR_OR_TEXT | --no-baselines]
    zerolm eval --model RUN_DIR --task cmmlu --data cmmlu/data [--shots 5] [--subjects agronomy,arts]
    zerolm eval --model RUN_DIR --task ceval --data ceval-exam [--split val]
    zerolm eval --model RUN_DIR --task mmlu  --data mmlu/data
    zerolm eval --model RUN_DIR --task arc   --data arc_easy/validation.jsonl [--shots 0]

The model is scored through `EngineScorer` (no server); the report is the same JSON
the HTTP endpoint returns.
"""

from __future__ import annotations

from itertools import chain, zip_longest
from pathlib import Path
from typing import Iterable

from serve.eval import arc, bpb
from serve.eval.baselines import NgramBaselines
from serve.eval.ceval import CEVAL
from serve.eval.cmmlu import CMMLU
from serve.eval.exams import Exam, load_exam
from serve.eval.mmlu import MMLU
from serve.eval.multiple_choice import evaluate_multiple_choice
from serve.eval.scorer import EngineScorer, Scorer
from zerolm.errors import UserError

EXAMS: dict[str, Exam] = {"cmmlu": CMMLU, "ceval": CEVAL, "mmlu": MMLU}
TASKS = ("bpb", *EXAMS, "arc")
DEFAULT_SHOTS = {"cmmlu": 5, "ceval": 5, "mmlu": 5, "arc": 0}  # the benchmarks' own settings; lm-eval's arc_easy


def bpb_documents(specs: list[str], *, split: str = "val", sources: list[str] | None = None,
                  limit: int | None = None, per_file: bool = False) -> dict[str, Iterable[str]]:
    """`--data` values -> source -> texts. A folder with manifest.json is a pack (its
    sources, or those named by `sources`); anything else is text, named NAME=PATH or
    after the file (or folder)."""
    out: dict[str, Iterable[str]] = {}
    for spec in specs:
        name, sep, raw = spec.partition("=")
        if not sep or "/" in name or not name:
            name, raw = "", spec
        path = Path(raw)
        if not path.exists():
            raise UserError(f"--data {raw}: no such file or folder")
        if (path / "manifest.json").is_file():
            docs = bpb.pack_documents(path, split=split, sources=sources, limit=limit)
            docs = {f"{name}/{k}" if name else k: v for k, v in docs.items()}
        else:
            docs = {name or path.stem or path.name: bpb.text_documents(path, per_file=per_file, limit=limit)}
        for key, texts in docs.items():
            if key in out:
                raise UserError(f"two --data sources are named {key!r}; name them with NAME=PATH")
            out[key] = texts
    if not out:
        raise UserError("task bpb needs --data: a pack folder (TOKENS_DIR) or text files")
    return out


def baseline_texts(data: list[str], baseline_train: list[str] | None) -> Iterable[str]:
    """What the n-gram baselines learn from: `baseline_train` (packs: their train split;
    text files), else the train split of every pack among `data`; sources interleaved,
    so a cap on training tokens takes some of each."""
    if baseline_train:
        sources = bpb_documents(baseline_train, split="train")
    else:
        packs = [d for d in data if (Path(d.partition("=")[2] or d) / "manifest.json").is_file()]
        sources = bpb_documents(packs, split="train") if packs else {}
    marker = object()
    return (t for t in chain.from_iterable(zip_longest(*sources.values(), fillvalue=marker)) if t is not marker)


def _other_exam(exam: Exam, subjects: set[str]) -> str | None:
    """The exam whose subject list holds all of `subjects` when `exam`'s holds none."""
    if not exam.subject_names or subjects & set(exam.subject_names):
        return None
    return next((name for name, other in EXAMS.items() if other.subject_names and subjects <= set(other.subject_names)),
                None)


def evaluate_exam(scorer: Scorer, exam: Exam, path: str, *, shots: int, subjects: list[str] | None = None,
                  limit: int | None = None, split: str | None = None, progress: bool = False) -> dict:
    """One exam benchmark, k-shot from its dev split (`zerolm eval` and the server's
    named evaluation sets both come here, so both give the same per-item answers)."""
    items, dev, info = load_exam(exam, path, subjects=subjects, limit=limit, split=split)
    other = _other_exam(exam, set(dev))
    if other:
        raise UserError(f"{path}: these are {other} subjects ({', '.join(sorted(dev)[:3])}, ...): use --task {other}")
    if shots and any(not dev[s] for s in dev):
        raise UserError(f"{shots}-shot needs a dev split for every subject; missing for "
                        f"{sorted(s for s in dev if not dev[s])[:5]}")
    report = evaluate_multiple_choice(scorer, items, exam.prompt, lambda it: dev[it.subject], shots=shots,
                                      task=exam.name, progress=progress)
    report.update(info)
    unnamed = sorted(s for s in dev if exam.subject_names and s not in exam.subject_names)
    if unnamed:  # the header then shows the file name in words
        report["subjects_without_official_name"] = unnamed
    report["continuation"] = (f"\"{exam.answer_prefix}{{letter}}\" after \"{exam.answer_cue}\", "
                              "as in the shots")
    return report


def evaluate(scorer: Scorer, task: str, data: list[str], *, shots: int | None = None, limit: int | None = None,
             subjects: list[str] | None = None, stride: int | None = None, split: str | None = None,
             per_file: bool = False, progress: bool = False, baselines: bool = True,
             baseline_train: list[str] | None = None) -> dict:
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if (shots is not None and shots < 0) or (limit is not None and limit < 1) or (stride is not None and stride < 1):
        raise UserError("--shots must be >= 0, --limit and --stride >= 1")
    if task == "bpb":
        docs = bpb_documents(data, split=split or "val", sources=subjects, limit=limit, per_file=per_file)
        ngrams = None
        if baselines:
            ngrams = NgramBaselines.train(scorer.encode, baseline_texts(data, baseline_train), scorer.vocab_size)
            if ngrams is None and baseline_train:
                raise UserError(f"--baseline-train {' '.join(baseline_train)}: no text to train the baselines on")
        report = bpb.evaluate_bpb(scorer, docs, stride=stride, progress=progress, baselines=ngrams)
        report["data"] = [str(d) for d in data]
        if ngrams is None:
            report["baselines"] = None  # text files only: say --baseline-train to have them
        return report
    if len(data) != 1:
        raise UserError(f"task {task} needs one --data path, got {len(data)}")
    k = DEFAULT_SHOTS[task] if shots is None else shots
    if task in EXAMS:
        report = evaluate_exam(scorer, EXAMS[task], data[0], shots=k, subjects=subjects, limit=limit,
                               split=split, progress=progress)
    else:
        if subjects:
            raise UserError("--subjects applies to the exam tasks and bpb, not arc")
        pool = arc.load_arc(data[0])
        items = pool[:limit] if limit is not None else pool
        report = evaluate_multiple_choice(scorer, items, arc.arc_prompt, arc.other_items(pool, k), shots=k,
                                          task="arc", progress=progress)
        report["continuation"] = "\" {choice text}\" after \"Answer:\" (lm-eval arc_easy)"
    report["data"] = str(data[0])
    return report


def run_eval(model: str, task: str, data: list[str], *, device: str = "auto", dtype: str = "auto",
             **kwargs) -> dict:
    """Load the model (a run folder or its hf/ export) and evaluate it on one task."""
    from serve.engine import Engine
    from serve.loading import load_model

    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if not data:
        raise UserError(f"task {task} needs --data (see `zerolm eval --help`)")
    for spec in data:  # check the inputs before spending time loading the model
        raw = spec.partition("=")[2] if "=" in spec and "/" not in spec.partition("=")[0] else spec
        if not Path(raw).exists():
            raise UserError(f"--data {raw}: no such file or folder")
    folder = Path(model).resolve()
    name = folder.parent.name if folder.name == "hf" else folder.name  # RUN_DIR/hf is named after RUN_DIR
    loaded = load_model(name, model, device=device, dtype=dtype)
    return evaluate(EngineScorer(Engine(loaded)), task, data, **kwargs)
