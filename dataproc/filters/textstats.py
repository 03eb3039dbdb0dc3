"""Vectorised per-document text statistics shared by the quality filters and the
outlier pass (one implementation of each ratio, so a filter and the outlier rule can
never disagree about what "symbol ratio" means).

A batch of documents is joined with "\\n" and viewed as one numpy array of code
points; each code point gets a character class from a lookup table, and per-document
sums are `bincount`s over a document-id array. All per-character work is in C; the
only per-document Python is `len()`.
Character classes: see charclass.py.
"""

from __future__ import annotations

import functools
from functools import cached_property

import numpy as np

from dataproc.filters.charclass import (  # noqa: F401  (re-exported for the filters)
    CJK,
    CJK_CHARCLASS,
    DIGIT,
    LATIN,
    LETTER,
    N_CLASSES,
    PUNCT,
    SPACE,
    SYMBOL,
    classify,
    lower,
)

_B = np.uint64(0x100000001B3)  # odd, so invertible modulo 2**64
_B_INV = np.uint64(pow(int(_B), -1, 1 << 64))


# Working arrays take ~50 bytes per character (code points, classes, document ids,
# 64-bit hashes); filters process a batch in slices of at most this many characters
# so one batch of huge documents cannot exhaust a worker's memory (~1 GB peak).
MAX_CHUNK_CHARS = 1 << 24


def chunk_slices(texts: list[str], max_chars: int | None = None) -> list[slice]:
    """Consecutive slices of `texts` of at most max_chars characters (or one doc)."""
    max_chars = max_chars or MAX_CHUNK_CHARS
    out, start, size = [], 0, 0
    for i, n in enumerate(map(len, texts)):
        if size and size + n > max_chars:
            out.append(slice(start, i))
            start, size = i, 0
        size += n
    out.append(slice(start, len(texts)))
    return out


def chunked(keep):
    """Decorator for `Filter.keep`: run it slice by slice (see MAX_CHUNK_CHARS).
    Every statistic is per document, so the result does not depend on the slicing."""

    @functools.wraps(keep)
    def wrapper(self, texts: list[str]):
        slices = chunk_slices(texts)
        if len(slices) == 1:
            return keep(self, texts)
        masks, reasons = [], []
        for part in slices:
            mask, why = keep(self, texts[part])
            masks.append(np.asarray(mask, dtype=bool))
            why = np.full(len(mask), why, dtype=object) if isinstance(why, str) else why
            reasons.append(np.asarray(why, dtype=object))
        return np.concatenate(masks), np.concatenate(reasons)

    return wrapper


def _powers(base: np.uint64, n: int) -> np.ndarray:
    """[1, base, base**2, ...] (n values) modulo 2**64."""
    out = np.ones(n, dtype=np.uint64)
    np.cumprod(np.full(max(n - 1, 0), base, dtype=np.uint64), out=out[1:])
    return out


def safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den == 0 (an empty document has no symbols)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


class Chars:
    """A batch of documents as one code-point array with classes and document ids."""

    def __init__(self, texts: list[str]):
        self.n = n = len(texts)
        lens = np.fromiter(map(len, texts), dtype=np.int64, count=n)
        joined = "\n".join(texts)
        self.joined = joined
        # surrogatepass: a lone surrogate must not crash a GB-scale job.
        self.cp = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        # Document i occupies [starts[i], starts[i] + lens[i]); the "\n" after it is
        # attributed to it as a whitespace character (so it also ends its last line).
        self.starts = np.concatenate(([0], np.cumsum(lens + 1)[:-1])) if n else np.zeros(0, np.int64)
        self.doc = np.repeat(np.arange(n, dtype=np.int32), lens + 1)[: len(self.cp)]
        self.cls = classify(self.cp)

    def per_doc(self, flags: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """Sum of `weights` (or count) over positions where `flags`, per document."""
        w = None if weights is None else weights[flags]
        return np.bincount(self.doc[flags], weights=w, minlength=self.n)

    @cached_property
    def counts(self) -> np.ndarray:
        """(n_docs, N_CLASSES) character counts per class."""
        flat = np.bincount(self.doc * N_CLASSES + self.cls, minlength=self.n * N_CLASSES)
        return flat.reshape(self.n, N_CLASSES)

    @cached_property
    def nonspace(self) -> np.ndarray:
        return self.counts.sum(axis=1) - self.counts[:, SPACE]

    @cached_property
    def tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """Words as (start, end) positions: maximal runs of letters/digits outside
        CJK, and every CJK character on its own (Chinese has no spaces)."""
        cjk = self.cls == CJK
        wordish = (self.cls == LATIN) | (self.cls == LETTER) | (self.cls == DIGIT)
        starts, ends = cjk | wordish, cjk | wordish
        starts[1:] &= cjk[1:] | ~wordish[:-1]
        ends[:-1] &= cjk[:-1] | ~wordish[1:]
        return np.flatnonzero(starts), np.flatnonzero(ends) + 1

    def token_hashes(self, lowercase: bool = False) -> np.ndarray:
        """64-bit polynomial hash of each token's code points (equal words, equal
        hashes; `lowercase`: case-insensitively), via prefix sums:
        hash[a:b] = (P[b] - P[a]) * B**-a mod 2**64."""
        start, end = self.tokens
        cp = lower(self.cp) if lowercase else self.cp.astype(np.uint64)
        prefix = np.zeros(len(cp) + 1, dtype=np.uint64)
        np.cumsum(cp * _powers(_B, len(cp)), out=prefix[1:])
        inverse = _powers(_B_INV, int(start[-1]) + 1 if len(start) else 0)
        return (prefix[end] - prefix[start]) * inverse[start]

    @cached_property
    def words(self) -> np.ndarray:
        """Words per document (see `tokens`)."""
        return np.bincount(self.doc[self.tokens[0]], minlength=self.n)

    @cached_property
    def latin_words(self) -> np.ndarray:
        return self.words - self.counts[:, CJK]

    @cached_property
    def lines(self) -> dict[str, np.ndarray]:
        """Per non-empty line: first/last non-space position and document."""
        line_id = np.cumsum(self.cp == 10) - (self.cp == 10)  # "\n" belongs to its line
        ns = np.flatnonzero(self.cls != SPACE)
        lid = line_id[ns]
        is_first = np.ones(len(ns), dtype=bool)
        is_first[1:] = lid[1:] != lid[:-1]
        is_last = np.ones(len(ns), dtype=bool)
        is_last[:-1] = lid[1:] != lid[:-1]
        first, last = ns[is_first], ns[is_last]
        return {"first": first, "last": last, "doc": self.doc[first]}

    @cached_property
    def n_lines(self) -> np.ndarray:
        """Non-empty lines per document."""
        return np.bincount(self.lines["doc"], minlength=self.n)


# Public per-document statistics (used by the filters and by outlier.STATISTICS).

def length(ch: Chars, cjk_weight: float = 1.0) -> np.ndarray:
    """Non-whitespace characters, a CJK character counting `cjk_weight`."""
    return ch.nonspace + (cjk_weight - 1.0) * ch.counts[:, CJK]


def letter_ratio(ch: Chars) -> np.ndarray:
    return safe_div(ch.counts[:, CJK] + ch.counts[:, LATIN], ch.nonspace)


def cjk_ratio(ch: Chars) -> np.ndarray:
    """Share of CJK among CJK + Latin letters: ~1 for Chinese, ~0 for English,
    independent of how much punctuation or digits a document has."""
    return safe_div(ch.counts[:, CJK], ch.counts[:, CJK] + ch.counts[:, LATIN])


def symbol_ratio(ch: Chars) -> np.ndarray:
    return safe_div(ch.counts[:, SYMBOL], ch.nonspace)


def digit_ratio(ch: Chars) -> np.ndarray:
    return safe_div(ch.counts[:, DIGIT], ch.nonspace)


def mean_line_length(ch: Chars) -> np.ndarray:
    """Mean characters per non-empty line (leading/trailing blanks excluded)."""
    ln = ch.lines
    line_len = (ln["last"] - ln["first"] + 1).astype(np.float64)
    return safe_div(np.bincount(ln["doc"], weights=line_len, minlength=ch.n), ch.n_lines)
