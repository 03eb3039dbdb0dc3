"""POST /v1/evaluations: the evaluation tasks over HTTP, scored through the server's
batching thread (`BatcherScorer`), so evaluations and completions share one model.

Request (serve/schemas.py EvaluationRequest):
  * {"task": "bpb", "texts": [...]} -> bits per byte / perplexity of the texts (one
    source, "texts"); `limit` keeps the first N texts.
  * {"task": "multiple_choice", "items": [{question, choices, answer, subject?, id?,
    format?}], "shots": k} -> accuracy. `answer` is the gold choice's index or label
    ("A", ...); `format` is "cmmlu" (default: the official CMMLU prompt, continuation
    the bare letter) or "arc" (lm-eval arc_easy: `Question: ...\\nAnswer:` + " text"),
    the same for every item. An item's shots are the first k other items of its subject.
  * {"task": "multiple_choice", "dataset": NAME} -> a local set chosen by name among
    those the server was started with (`zerolm serve --eval-set NAME=[TASK:]PATH`; none
    by default), scored as `zerolm eval --task TASK --data PATH` scores it (shots from
    the dev split, the benchmark's prompt). A request never names a path: a path-like
    or unknown name is a 400. `limit` is per subject.

The work of one request is bounded (items, choices, text bytes); beyond it, a 400.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping

from serve.eval import arc, bpb, cmmlu
from serve.eval.exams import find_files
from serve.eval.multiple_choice import LETTERS, MCItem, evaluate_multiple_choice
from serve.eval.scorer import BatcherScorer
from serve.openai_api import APIError
from zerolm.errors import UserError

MAX_ITEMS = 2000
MAX_SEQUENCES = 8000  # items x choices: each choice is one scored sequence
MAX_CHOICES = len(LETTERS)
MAX_TEXTS = 1000
MAX_TEXT_BYTES = 1 << 20
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # a dataset name: no "/", "\", "." or ".."


@dataclass(frozen=True)
class EvalDataset:
    """A local evaluation set that the server's operator configured."""

    kind: Literal["cmmlu", "ceval", "mmlu", "arc"]
    path: Path


def _detect_kind(name: str, path: Path) -> str:
    from serve.eval.run import EXAMS

    if path.is_file():
        return "arc"
    head = re.split(r"[-_.]", name.lower())[0]
    if head in EXAMS:
        return head
    subjects = {s for files in find_files(path).values() for s in files}
    for kind in ("cmmlu", "ceval"):
        if subjects <= set(EXAMS[kind].subject_names):
            return kind
    raise UserError(f"--eval-set {name}={path}: cannot tell which benchmark this is; "
                    f"say it: {name}=TASK:{path} (TASK: {', '.join(EXAMS)} or arc)")


def parse_eval_sets(specs: list[str]) -> dict[str, EvalDataset]:
    """`NAME=[TASK:]PATH` values of --eval-set; every path is checked now, at start."""
    from serve.eval.run import EXAMS

    sets: dict[str, EvalDataset] = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if not sep or not NAME.fullmatch(name):
            raise UserError(f"--eval-set {spec!r}: expected NAME=[TASK:]PATH, NAME of letters, digits, - and _")
        task, colon, raw = rest.partition(":")
        if not colon or task not in (*EXAMS, "arc"):
            task, raw = "", rest
        path = Path(raw)
        if not path.exists():
            raise UserError(f"--eval-set {name}: {path}: no such file or folder")
        if name in sets:
            raise UserError(f"--eval-set {name} given twice")
        kind = task or _detect_kind(name, path)
        if kind == "arc":
            arc.load_arc(path)  # a broken file is the operator's error at start, not a 500 later
        else:
            find_files(path)
        sets[name] = EvalDataset(kind, path)
    return sets


def run_evaluation(served, req, datasets: Mapping[str, EvalDataset] | None = None) -> dict:
    """served: serve.registry.ServedModel; req: serve.schemas.EvaluationRequest."""
    scorer = BatcherScorer(served)
    try:
        if req.task == "bpb":
            return _bpb(scorer, req)
        return _multiple_choice(scorer, req, datasets or {})
    except UserError as exc:  # a problem with what the request asked for
        raise APIError(400, str(exc)) from exc


def _bpb(scorer, req) -> dict:
    if req.dataset is not None or req.items is not None:
        raise APIError(400, "task bpb scores 'texts' (a list of documents)", param="texts")
    if not req.texts:
        raise APIError(400, "task bpb needs 'texts': a non-empty list of documents", param="texts")
    texts = req.texts[:req.limit] if req.limit else req.texts
    if len(texts) > MAX_TEXTS:
        raise APIError(400, f"at most {MAX_TEXTS} texts per request, got {len(texts)}", param="texts")
    size = sum(len(t.encode("utf-8")) for t in texts)
    if size > MAX_TEXT_BYTES:
        raise APIError(400, f"texts total {size} bytes; at most {MAX_TEXT_BYTES} per request", param="texts")
    empty = [i for i, t in enumerate(texts) if not t]
    if empty:
        raise APIError(400, f"texts[{empty[0]}] is empty", param="texts")
    return bpb.evaluate_bpb(scorer, {"texts": texts})


def _item(raw, i: int) -> tuple[MCItem, str]:
    where = f"items[{i}]"
    if not isinstance(raw, dict):
        raise APIError(400, f"{where} must be an object", param=where)
    question, choices, answer = raw.get("question"), raw.get("choices"), raw.get("answer")
    if not isinstance(question, str) or not question:
        raise APIError(400, f"{where}.question must be a non-empty string", param=f"{where}.question")
    if (not isinstance(choices, list) or not 2 <= len(choices) <= MAX_CHOICES
            or not all(isinstance(c, str) and c for c in choices)):
        raise APIError(400, f"{where}.choices must be 2 to {MAX_CHOICES} non-empty strings",
                       param=f"{where}.choices")
    labels = list(LETTERS[:len(choices)])
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        gold = answer
    elif isinstance(answer, str) and answer in labels:
        gold = labels.index(answer)
    else:
        raise APIError(400, f"{where}.answer must be a choice index (0..{len(choices) - 1}) or label "
                       f"({labels[0]}..{labels[-1]})", param=f"{where}.answer")
    fmt = raw.get("format", "cmmlu")
    if fmt not in ("cmmlu", "arc"):
        raise APIError(400, f"{where}.format must be 'cmmlu' or 'arc'", param=f"{where}.format")
    subject = raw.get("subject") or "default"
    item_id = raw.get("id", i)
    if not isinstance(subject, str) or not isinstance(item_id, (str, int)):
        raise APIError(400, f"{where}: subject and id must be strings", param=where)
    return MCItem(id=str(item_id), subject=subject, question=question, choices=list(choices), gold=gold,
                  labels=labels), fmt


def _dataset(name: str, datasets: Mapping[str, EvalDataset], limit: int | None):
    if not NAME.fullmatch(name):
        raise APIError(400, "'dataset' is the name of an evaluation set this server was started with, "
                       "not a path", param="dataset")
    if name not in datasets:
        have = ", ".join(sorted(datasets)) or "none"
        raise APIError(400, f"no evaluation set named {name!r} on this server (configured: {have}); "
                       "send 'items' instead", param="dataset")
    ds = datasets[name]
    try:
        if ds.kind != "arc":
            from serve.eval.exams import load_exam
            from serve.eval.run import EXAMS

            exam = EXAMS[ds.kind]
            items, dev, _ = load_exam(exam, ds.path, limit=limit)
            return items, exam.prompt, (lambda it: dev[it.subject]), ds.kind
        pool = arc.load_arc(ds.path)
        return (pool[:limit] if limit else pool), arc.arc_prompt, arc.other_items(pool, 10), "arc"
    except UserError as exc:  # the operator's files, not the request: not a 400
        raise APIError(500, f"evaluation set {name!r} is unreadable: {exc}", type="internal_error") from exc


def _multiple_choice(scorer, req, datasets: Mapping[str, EvalDataset]) -> dict:
    if (req.items is None) == (req.dataset is None):
        raise APIError(400, "task multiple_choice needs exactly one of 'items' or 'dataset'", param="items")
    if req.texts is not None:
        raise APIError(400, "task multiple_choice does not take 'texts'", param="texts")
    if req.dataset is not None:
        items, fmt, shots_of, task = _dataset(req.dataset, datasets, req.limit)
    else:
        if not req.items:
            raise APIError(400, "'items' is empty", param="items")
        raw = req.items[:req.limit] if req.limit else req.items
        if len(raw) > MAX_ITEMS:  # checked before parsing: the parse itself is work
            raise APIError(400, f"at most {MAX_ITEMS} items per request, got {len(raw)}", param="items")
        parsed = [_item(r, i) for i, r in enumerate(raw)]
        formats = {f for _, f in parsed}
        if len(formats) > 1:
            raise APIError(400, "all items must use the same format", param="items")
        items, task = [it for it, _ in parsed], formats.pop()
        fmt = cmmlu.cmmlu_prompt if task == "cmmlu" else arc.arc_prompt
        by_subject: dict[str, list[MCItem]] = {}
        for it in items:
            by_subject.setdefault(it.subject, []).append(it)
        shots_of = (lambda it: [o for o in by_subject[it.subject][:req.shots + 1] if o is not it][:req.shots])
    if len(items) > MAX_ITEMS:
        raise APIError(400, f"{len(items)} items; at most {MAX_ITEMS} per request (use 'limit')", param="limit")
    n_seqs = sum(len(it.choices) for it in items)
    if n_seqs > MAX_SEQUENCES:
        raise APIError(400, f"{n_seqs} choices in all; at most {MAX_SEQUENCES} per request", param="items")
    return evaluate_multiple_choice(scorer, items, fmt, shots_of, shots=req.shots, task=task)
