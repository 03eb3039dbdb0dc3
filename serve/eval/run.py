"""`zerolm eval`: one task over local data with a model loaded in this process.

    zerolm eval --model RUN_DIR --task bpb   --data TOKENS_DIR [--data NAME=notes.txt] [--limit 200]
    zerolm eval --model RUN_DIR --task cmmlu --data cmmlu/data [--shots 5] [--subjects agronomy,arts]
    zerolm eval --model RUN_DIR --task arc   --data arc_easy/validation.jsonl [--shots 0]

The model is scored through `EngineScorer` (no server); the report is the same JSON
the HTTP endpoint returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from serve.eval import arc, bpb, cmmlu
from serve.eval.multiple_choice import evaluate_multiple_choice
from serve.eval.scorer import EngineScorer, Scorer
from zerolm.errors import UserError

TASKS = ("bpb", "cmmlu", "arc")
DEFAULT_SHOTS = {"cmmlu": 5, "arc": 0}  # CMMLU's official setting; lm-eval's arc_easy default


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


def evaluate(scorer: Scorer, task: str, data: list[str], *, shots: int | None = None, limit: int | None = None,
             subjects: list[str] | None = None, stride: int | None = None, split: str = "val",
             per_file: bool = False, progress: bool = False) -> dict:
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if (shots is not None and shots < 0) or (limit is not None and limit < 1) or (stride is not None and stride < 1):
        raise UserError("--shots must be >= 0, --limit and --stride >= 1")
    if task == "bpb":
        docs = bpb_documents(data, split=split, sources=subjects, limit=limit, per_file=per_file)
        report = bpb.evaluate_bpb(scorer, docs, stride=stride, progress=progress)
        report["data"] = [str(d) for d in data]
        return report
    if len(data) != 1:
        raise UserError(f"task {task} needs one --data path, got {len(data)}")
    k = DEFAULT_SHOTS[task] if shots is None else shots
    if task == "cmmlu":
        items, dev = cmmlu.load_cmmlu(data[0], subjects=subjects, limit=limit)
        if k and any(not dev[s] for s in dev):
            raise UserError(f"{k}-shot needs dev/<subject>.csv for every subject; missing for "
                            f"{sorted(s for s in dev if not dev[s])[:5]}")
        report = evaluate_multiple_choice(scorer, items, cmmlu.cmmlu_prompt, lambda it: dev[it.subject], shots=k,
                                          task="cmmlu", progress=progress)
        report["continuation"] = "the bare choice letter after 答案： (\"A\", no space), as in the shots"
    else:
        if subjects:
            raise UserError("--subjects applies to cmmlu and bpb, not arc")
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
