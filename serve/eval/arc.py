"""ARC-style multiple choice from JSONL, in lm-evaluation-harness's arc_easy format.

One question per line: {"id", "question", "choices": {"text": [...], "label": [...]},
"answerKey"} (the AI2 ARC / HF datasets layout; labels are letters or digits).

Prompt (lm-eval arc_easy): `Question: {question}\nAnswer:` and each continuation is
` {choice text}`; a shot is `Question: ...\nAnswer: {gold text}` followed by a blank
line. The file has no separate dev split, so an item's shots are the first k other
items of the file. Both acc and acc_norm (log-likelihood per byte of the choice
text) are reported.
"""

from __future__ import annotations

import json
from pathlib import Path

from serve.eval.multiple_choice import MCItem, Prompt
from zerolm.errors import UserError


def arc_prompt(item: MCItem, shots: list[MCItem]) -> Prompt:
    shown = "".join(f"Question: {s.question}\nAnswer: {s.choices[s.gold]}\n\n" for s in shots)
    return Prompt(f"{shown}Question: {item.question}\nAnswer:", [f" {c}" for c in item.choices])


def parse_arc_line(obj: dict, subject: str, where: str) -> MCItem:
    try:
        texts, labels = obj["choices"]["text"], obj["choices"]["label"]
        question, key = obj["question"], str(obj["answerKey"])
    except (KeyError, TypeError) as exc:
        raise UserError(f"{where}: missing field {exc} (needs question, choices.text, choices.label, answerKey)")
    if not (isinstance(texts, list) and isinstance(labels, list) and len(texts) == len(labels) >= 2):
        raise UserError(f"{where}: choices.text and choices.label must be lists of the same length (>= 2)")
    labels = [str(x) for x in labels]
    if key not in labels:
        raise UserError(f"{where}: answerKey {key!r} is not one of the labels {labels}")
    return MCItem(id=str(obj.get("id", where)), subject=subject, question=str(question),
                  choices=[str(t) for t in texts], gold=labels.index(key), labels=labels)


def load_arc(path: str | Path) -> list[MCItem]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file (ARC-style JSONL expected)")
    # validation.jsonl in arc_easy/ -> subject "arc_easy"; my_set.jsonl -> "my_set"
    generic = path.stem in ("validation", "valid", "val", "test", "train", "dev")
    subject = path.parent.name if generic and path.parent.name else path.stem
    items = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{line_no}: bad JSON ({exc.msg})")
            items.append(parse_arc_line(obj, subject, f"{path}:{line_no}"))
    if not items:
        raise UserError(f"{path}: no questions")
    return items


def other_items(pool: list[MCItem], k: int):
    """shots_of for a set without a dev split: its first k items other than the item itself."""
    def shots_of(item: MCItem) -> list[MCItem]:
        return [p for p in pool[:k + 1] if p is not item][:k]

    return shots_of
