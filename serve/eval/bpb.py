"""Bits per byte (and per-token perplexity) per domain, fair across tokenizers.

The documents are text: either the validation split of a pack (TOKENS_DIR, possibly
made with another tokenizer: each document is decoded back to text with the pack's
own tokenizer) or raw text files. Every document is re-encoded with the *model's*
tokenizer, opened with the document-start token it followed in training
(<|endoftext|>), and each of its tokens is scored once. The nats are divided by the
UTF-8 bytes of the same document text, so two models with different vocabularies are
compared on the same denominator; perplexity per token is reported too, but it is
only comparable between models that share a tokenizer.

Documents longer than the model's context are scored in overlapping windows: a
window ends `stride` tokens after the previous one and spans the full context, and
only its not-yet-scored tail counts, so each token is scored exactly once with at
least `context - stride` tokens of left context (stride 1 gives every token the full
context, at `context` times the cost; the default, context // 2, costs 2x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np
from tokenizers import Tokenizer

from serve.eval.baselines import NgramBaselines
from serve.eval.scorer import Scorer, score_sequences
from zerolm.errors import UserError

LN2 = math.log(2)
READ_CHUNK = 1 << 20  # tokens read from a pack source at a time
FLUSH_TOKENS = 1 << 20  # windows held before they are scored


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a sequence of n tokens whose targets are tokens 1..n-1.

    Returns (start, end, first): seq[start:end] (at most `context` tokens) is scored and
    its targets first..end-1 count. Together the windows count every target once."""
    if context < 2:
        raise ValueError("context must be at least 2 tokens")
    if not 1 <= stride < context:
        raise ValueError(f"stride must be in [1, {context - 1}], got {stride}")
    if n < 2:
        return []
    end = min(context, n)
    out = [(0, end, 1)]
    while end < n:
        new_end = min(end + stride, n)
        out.append((max(0, new_end - context), new_end, end))
        end = new_end
    return out


@dataclass
class Totals:
    docs: int = 0
    tokens: int = 0  # scored tokens of the model's tokenizer (the document-start token excluded)
    bytes: int = 0  # UTF-8 bytes of the document texts
    nats: float = 0.0
    baseline_nats: dict[str, float] = field(default_factory=dict)  # n-gram name -> nats on the same tokens

    def add(self, other: "Totals") -> None:
        self.docs += other.docs
        self.tokens += other.tokens
        self.bytes += other.bytes
        self.nats += other.nats
        for name, nats in other.baseline_nats.items():
            self.baseline_nats[name] = self.baseline_nats.get(name, 0.0) + nats

    def row(self) -> dict:
        row = {"docs": self.docs, "tokens": self.tokens, "bytes": self.bytes, "nats": self.nats,
               "bpb": self.nats / LN2 / self.bytes if self.bytes else None,
               "ppl": math.exp(self.nats / self.tokens) if self.tokens else None}
        for name, nats in self.baseline_nats.items():
            row[f"{name}_bpb"] = nats / LN2 / self.bytes if self.bytes else None
        return row


def evaluate_bpb(scorer: Scorer, documents: Mapping[str, Iterable[str]], *, stride: int | None = None,
                 progress: bool = False, baselines: NgramBaselines | None = None) -> dict:
    """documents: source -> document texts (any iterable: a pack split is read lazily).
    Returns the report (see module docstring); with `baselines`, each row also has
    their bits per byte on the same tokens and bytes (serve/eval/baselines.py)."""
    start_id = scorer.doc_start_id
    if start_id is None:
        raise UserError(f"model {scorer.name!r}: its tokenizer has no <|endoftext|> token to open a document "
                        "with, so the first token of a document could not be scored")
    ctx = scorer.context
    stride = stride or max(1, ctx // 2)
    if not 1 <= stride < ctx:
        raise UserError(f"stride must be between 1 and {ctx - 1} (the model's context is {ctx})")
    totals = {name: Totals() for name in documents}
    pending: list[tuple[str, int, list[int]]] = []  # (source, index of the window's first counted token, window)
    pending_docs: dict[str, list[list[int]]] = {name: [] for name in documents}  # for the baselines

    def flush():
        logprobs = score_sequences(scorer, [w for _, _, w in pending], progress=progress)
        for (name, first, _), lps in zip(pending, logprobs):
            # lps[j]: logprob of window token j given the tokens before it (lps[0] is None)
            totals[name].nats -= math.fsum(lps[first:])
        pending.clear()
        for name, docs in pending_docs.items():
            if baselines is not None and docs:
                totals[name].add(Totals(baseline_nats=baselines.nats(docs)))
            docs.clear()

    for name, texts in documents.items():
        t = totals[name]
        for text in texts:
            ids = scorer.encode(text)
            t.docs += 1
            t.bytes += len(text.encode("utf-8"))
            t.tokens += len(ids)
            pending_docs[name].append(ids)
            seq = [start_id] + ids
            for start, end, first in windows(len(seq), ctx, stride):
                pending.append((name, first - start, seq[start:end]))
            if len(pending) * ctx >= FLUSH_TOKENS:  # bounded memory on a large split
                flush()
    flush()
    overall = Totals()
    for t in totals.values():
        overall.add(t)
    report = {"task": "bpb", "model": scorer.name, "context": ctx, "stride": stride,
              "sources": {name: t.row() for name, t in totals.items()}, "overall": overall.row()}
    if baselines is not None:
        report["baselines"] = baselines.describe()
    return report


# ------------------------------------------------------------------ documents
def _documents(source, separator: int, limit: int | None) -> Iterator[np.ndarray]:
    """Token ids of each document of a pack source (the separator follows every one),
    read a chunk at a time."""
    n = 0
    carry = np.empty(0, dtype=np.int64)
    pos = 0
    while pos < source.n_tokens:
        chunk = source.read(pos, min(READ_CHUNK, source.n_tokens - pos))
        pos += len(chunk)
        buf = np.concatenate([carry, chunk])
        prev = 0
        for cut in np.flatnonzero(buf == separator):
            if limit is not None and n >= limit:
                return
            if cut > prev:
                yield buf[prev:cut]
                n += 1
            prev = int(cut) + 1
        carry = buf[prev:]
    if carry.size and (limit is None or n < limit):
        yield carry  # a final document without its separator


def pack_documents(tokens_dir: str | Path, *, split: str = "val", sources: list[str] | None = None,
                   limit: int | None = None) -> dict[str, Iterator[str]]:
    """source -> the document texts of a pack split (lazily), decoded with the pack's
    own tokenizer. limit: documents per source."""
    from train.data import PackedSplit, tokenizer_dir_of

    data = PackedSplit(tokens_dir, split, sources)
    tok = Tokenizer.from_file(str(tokenizer_dir_of(tokens_dir, data.manifest) / "tokenizer.json"))

    def texts(source) -> Iterator[str]:
        for ids in _documents(source, data.separator_id, limit):
            # byte-level BPE: decoding the ids of a whole document gives its text back exactly
            yield tok.decode(ids.tolist(), skip_special_tokens=False)

    return {name: texts(source) for name, source in data.sources.items()}


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")  # as stored: no newline translation
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})")


def text_documents(path: str | Path, *, per_file: bool = False, limit: int | None = None) -> list[str]:
    """A text file: one document per non-empty line, or the whole file (per_file).
    A folder: each *.txt file in it (sorted) is one document."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise UserError(f"{path}: no *.txt files")
        docs = [t for t in (_read_text(f) for f in files) if t.strip()]
    elif path.is_file():
        text = _read_text(path)
        # "\n" only (not str.splitlines, which also splits on \x0b, \u2028, ...); a CRLF
        # file's "\r" is line ending, not text
        docs = [text] if per_file else [ln.removesuffix("\r") for ln in text.split("\n") if ln.strip()]
    else:
        raise UserError(f"{path}: no such file or folder")
    return docs[:limit] if limit is not None else docs
