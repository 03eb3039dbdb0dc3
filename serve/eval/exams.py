"""Exam benchmarks shipped as subject files (CMMLU, C-Eval, MMLU), read in the layouts
their distributions come in, as downloaded:

  per-split folders    ROOT/{dev,val,test}/<subject>.csv or <subject>_{dev,val,test}.csv
                       (CMMLU's and C-Eval's zips, MMLU's data.tar: data/dev/abstract_algebra_dev.csv)
  per-subject folders  ROOT/<subject>/{dev,val,validation,test}[-00000-of-00001].{parquet,jsonl,csv}
                       (the Hugging Face datasets: ceval/ceval-exam, cais/mmlu, the CMMLU parquet export)

ROOT may be the folder holding data/; `validation` and `valid` mean val. Rows:
  CSV with a header    a question column, one column per choice letter (A, B, ...), an
                       answer column (a letter); a first column named "" or id is the id
  CSV without header   MMLU: question, choices..., answer letter
  parquet / jsonl      question (or Question); choices as a list or as A, B, ... columns;
                       answer as a letter or a 0-based index
A split whose rows have no answer (C-Eval's test split) cannot be scored: the
benchmark's default split is used instead (C-Eval: val), and the report says so.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from serve.eval.multiple_choice import LETTERS, MCItem, Prompt
from zerolm.errors import UserError

SPLIT_NAMES = {"dev": ("dev",), "val": ("val", "validation", "valid"), "test": ("test",)}
EXTENSIONS = (".csv", ".parquet", ".jsonl")
SHARD = re.compile(r"-\d{5}-of-\d{5}$")  # Hugging Face's parquet shard suffix
SKIP_FOLDERS = {"all", "auxiliary_train"}  # cais/mmlu: every subject again, and a training set


def _split_named(name: str) -> str | None:
    return next((split for split, names in SPLIT_NAMES.items() if name in names), None)


@dataclass(frozen=True)
class Exam:
    name: str
    eval_split: str  # the split scored by default
    header: str  # the benchmark's own prompt header, with {subject}
    subject_names: dict[str, str]  # file name -> the name the header uses
    answer_prefix: str  # between the answer cue and the letter: "" (答案：A) or " " (Answer: A)
    answer_cue: str  # "答案：" or "Answer:"
    question_prefix: str = ""  # CMMLU: "题目："
    eval_note: str = ""  # said in every report of the default split

    def subject(self, file_name: str) -> str:
        return self.subject_names.get(file_name, file_name.replace("_", " "))

    def example(self, item: MCItem) -> str:
        options = "".join(f"\n{label}. {choice}" for label, choice in zip(item.labels, item.choices))
        return f"{self.question_prefix}{item.question}{options}\n{self.answer_cue}"

    def prompt(self, item: MCItem, shots: list[MCItem]) -> Prompt:
        shown = "".join(self.example(s) + self.answer_prefix + s.labels[s.gold] + "\n\n" for s in shots)
        return Prompt(self.header.format(subject=self.subject(item.subject)) + shown + self.example(item),
                      [self.answer_prefix + label for label in item.labels])


# ------------------------------------------------------------------ finding files
def _data_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in EXTENSIONS)


def find_files(path: str | Path) -> dict[str, dict[str, Path]]:
    """split -> subject -> file, over every layout in the module docstring."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such folder (an exam benchmark is a folder of subject files)")
    root = path / "data" if (path / "data").is_dir() else path
    found: dict[str, dict[str, Path]] = {split: {} for split in SPLIT_NAMES}
    for sub in sorted(d for d in root.iterdir() if d.is_dir() and d.name not in SKIP_FOLDERS):
        folder_split = _split_named(sub.name)
        for f in _data_files(sub):
            stem = SHARD.sub("", f.stem)
            if folder_split:  # per-split folder: <subject>.csv or <subject>_<split>.csv
                found[folder_split][stem.removesuffix("_" + sub.name)] = f
            else:  # per-subject folder: <split>-00000-of-00001.parquet, <subject>_<split>.csv
                split = _split_named(stem) or _split_named(stem.rpartition("_")[2])
                if split:
                    found[split][sub.name] = f
    found = {split: files for split, files in found.items() if files}
    if not found:
        raise UserError(f"{path}: no exam files (expected dev/ val/ test/ folders of <subject>.csv, or one folder "
                        "per subject with dev/val/test .csv, .parquet or .jsonl files)")
    return found


# ------------------------------------------------------------------ reading rows
def _answer_index(value, labels: list[str], where: str) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, (int,)) and not isinstance(value, bool):
        if 0 <= value < len(labels):
            return int(value)
        raise UserError(f"{where}: answer index {value} out of range for {len(labels)} choices")
    text = str(value).strip()
    if text in labels:
        return labels.index(text)
    raise UserError(f"{where}: answer {text!r} is not one of {labels}")


def _from_record(rec: dict, where: str) -> tuple[str, str, list[str], int | None]:
    """(id or "", question, choices, gold or None) of one parquet / jsonl record."""
    lower = {str(k).lower(): k for k in rec}
    if "question" not in lower:
        raise UserError(f"{where}: no question field (has {sorted(rec)[:8]})")
    question = str(rec[lower["question"]])
    listed = rec.get(lower["choices"]) if "choices" in lower else None
    if listed is not None and not isinstance(listed, (str, dict)):  # a list (or a numpy array from parquet)
        choices = [str(c) for c in list(listed)]
    else:
        choices = [str(rec[k]) for k in LETTERS if k in rec and rec[k] is not None]
    if len(choices) < 2:
        raise UserError(f"{where}: fewer than 2 choices")
    answer = rec[lower["answer"]] if "answer" in lower else None
    if hasattr(answer, "item"):
        answer = answer.item()  # a numpy scalar from parquet
    gold = _answer_index(answer, list(LETTERS[:len(choices)]), where)
    return str(rec.get(lower.get("id", ""), "") or ""), question, choices, gold


def _csv_rows(path: Path):
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            rows = [r for r in csv.reader(fh)]
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 ({exc.reason})")
    rows = [(i, r) for i, r in enumerate(rows, start=1) if any(c.strip() for c in r)]
    if not rows:
        return
    header = [h.strip() for h in rows[0][1]]
    lower = [h.lower() for h in header]
    if "question" in lower:
        letters = [i for i, h in enumerate(header) if len(h) == 1 and h.isupper()]
        if len(letters) < 2:
            raise UserError(f"{path}: expected columns Question, A, B, ..., Answer; got {header}")
        q_col = lower.index("question")
        a_col = lower.index("answer") if "answer" in lower else None
        id_col = 0 if lower[0] in ("", "id") else None
        for line, row in rows[1:]:
            if len(row) < len(header):
                raise UserError(f"{path}:{line}: {len(row)} columns, expected {len(header)}")
            rec = {"question": row[q_col], "choices": [row[i] for i in letters],
                   "answer": row[a_col] if a_col is not None else None,
                   "id": (row[id_col].strip() if id_col is not None else "") or str(line - 2)}
            yield f"{path}:{line}", rec
    else:  # MMLU: no header; question, choices..., answer
        for line, row in rows:
            if len(row) < 3:
                raise UserError(f"{path}:{line}: {len(row)} columns; expected question, choices..., answer")
            yield f"{path}:{line}", {"question": row[0], "choices": row[1:-1], "answer": row[-1],
                                     "id": str(line - 1)}


def _records(path: Path):
    if path.suffix == ".csv":
        yield from _csv_rows(path)
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            for line, text in enumerate(fh, start=1):
                if text.strip():
                    try:
                        rec = json.loads(text)
                    except json.JSONDecodeError as exc:
                        raise UserError(f"{path}:{line}: bad JSON ({exc.msg})")
                    yield f"{path}:{line}", {**rec, "id": str(rec.get("id", line - 1))}
    else:
        import pyarrow.parquet as pq

        for i, rec in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}:row {i}", {**rec, "id": str(rec.get("id", i))}


def read_subject(path: Path, subject: str) -> tuple[list[MCItem], int]:
    """(items with an answer, rows without one)."""
    items, unanswered = [], 0
    for where, rec in _records(path):
        item_id, question, choices, gold = _from_record(rec, where)
        if gold is None:
            unanswered += 1
            continue
        items.append(MCItem(id=f"{subject}/{item_id}", subject=subject, question=question, choices=choices,
                            gold=gold))
    return items, unanswered


# ------------------------------------------------------------------ loading
def load_exam(exam: Exam, path: str | Path, *, subjects: list[str] | None = None, limit: int | None = None,
              split: str | None = None) -> tuple[list[MCItem], dict[str, list[MCItem]], dict]:
    """(evaluation items, subject -> dev items for shots, info: split scored and why)."""
    files = find_files(path)
    wanted = split or exam.eval_split
    wanted = next((s for s, names in SPLIT_NAMES.items() if wanted in names), wanted)
    info = {"split": wanted, **({"note": exam.eval_note} if exam.eval_note and split is None else {})}
    if wanted not in files:
        raise UserError(f"{path}: no {wanted} split (found {', '.join(sorted(files))})")
    table = files[wanted]
    if subjects:
        unknown = sorted(set(subjects) - set(table))
        if unknown:
            raise UserError(f"unknown subject(s) {unknown}; the {wanted} split of {path} has {len(table)}: "
                            f"{', '.join(sorted(table)[:8])}{', ...' if len(table) > 8 else ''}")
    items, dev = [], {}
    for subject in subjects or sorted(table):
        rows, unanswered = read_subject(table[subject], subject)
        if unanswered and not rows:
            fallback = "val" if wanted != "val" and "val" in files and subject in files["val"] else None
            if split is None and fallback:  # C-Eval's test split: score val instead, and say so
                rows, _ = read_subject(files["val"][subject], subject)
                info["split"] = "val"
                info["note"] = f"the {wanted} split has no answers; scored the val split"
            else:
                raise UserError(f"{table[subject]}: no answers in the {wanted} split"
                                + (" (C-Eval publishes none for test: use --split val)" if exam.name == "ceval"
                                   else ""))
        items += rows[:limit] if limit is not None else rows
        dev_file = files.get("dev", {}).get(subject)
        dev[subject] = read_subject(dev_file, subject)[0] if dev_file else []
    if not items:
        raise UserError(f"{path}: no questions in the {wanted} split")
    return items, dev, info
