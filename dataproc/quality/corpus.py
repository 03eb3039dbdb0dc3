"""Labelled training text for the quality and language models, read on one machine.

Inputs are the same InputSpecs as `zerolm data run` (paths, globs, formats, text
fields, txt modes), read with the pipeline's own readers, so a training recipe can
name any file the cleaning job could read. The text is normalized like the corpus,
exact duplicates are removed (CMRC repeats a context for every question: a copy in
the training and the held-out split would inflate the metrics), each source is capped
by a deterministic sample, and the held-out split is a hash of the text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from dataproc.base import DROP, SOURCE, TEXT
from dataproc.config import InputSpec
from dataproc.quality.textprep import normalize
from dataproc.readers import read_task
from dataproc.sources import plan_read_tasks
from zerolm.errors import UserError


@dataclass
class Doc:
    text: str
    source: str
    label: str


def text_hash(text: str, salt: str = "") -> float:
    """A number in [0, 1) from the text alone: the same split on every machine and run."""
    digest = hashlib.blake2b((salt + text).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def read_texts(inputs: list[InputSpec], *, min_chars: int, max_docs_per_source: int) -> list[tuple[str, str]]:
    """(source, normalized text) of every readable record, deduplicated, each source
    capped at max_docs_per_source (the documents with the smallest text hashes)."""
    if not inputs:
        return []
    by_source: dict[str, dict[str, None]] = {}
    for task in plan_read_tasks(inputs, chunk_bytes=1 << 30):
        table = read_task(task.to_row(), max_record_bytes=8 << 20, raw_cap=0)
        for text, source, drop in zip(table.column(TEXT).to_pylist(), table.column(SOURCE).to_pylist(),
                                      table.column(DROP).to_pylist()):
            if drop is not None or not text:
                continue
            text = normalize(text).strip()
            if len(text) >= min_chars:
                by_source.setdefault(source, {})[text] = None  # dict: ordered set
    out = []
    for source, texts in sorted(by_source.items()):
        kept = sorted(texts, key=text_hash)[:max_docs_per_source]
        out += [(source, t) for t in kept]
    return out


def labelled(groups: dict[str, list[InputSpec]], *, min_chars: int, max_docs_per_source: int,
             balance: bool) -> list[Doc]:
    """Documents of every label; `balance` subsamples every label to the smallest one
    (fastText has no class weights, and a 1:5 prior would skew the score)."""
    docs: dict[str, list[Doc]] = {}
    seen: set[str] = set()
    for label, inputs in groups.items():
        rows = read_texts(inputs, min_chars=min_chars, max_docs_per_source=max_docs_per_source)
        # A text under two labels teaches nothing; keep its first label only.
        docs[label] = [Doc(t, s, label) for s, t in rows if t not in seen]
        seen.update(t for _, t in rows)
        if not docs[label]:
            raise UserError(f"no usable documents for label {label!r} (inputs: {[i.path for i in inputs]}; "
                            f"documents need at least {min_chars} characters)")
    if balance:
        n = min(len(d) for d in docs.values())
        docs = {label: sorted(d, key=lambda doc: text_hash(doc.text, "balance"))[:n] for label, d in docs.items()}
    return [doc for label in groups for doc in docs[label]]


def split(docs: list[Doc], heldout: float) -> tuple[list[Doc], list[Doc]]:
    """(train, held-out) by a hash of each text."""
    train, test = [], []
    for doc in docs:
        (test if text_hash(doc.text, "heldout") < heldout else train).append(doc)
    return train, test
