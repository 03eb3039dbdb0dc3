"""Shingling a batch of documents into 64-bit shingle hashes, vectorised.

A batch comes out in CSR form: `hashes` (N,) uint64 and `counts` (n_docs,), document
i's shingles being hashes[off[i]:off[i] + counts[i]] with off = cumsum(counts) -
counts. Duplicated shingles inside a document are kept (MinHash ignores them, SimHash
counts them as weights).

Kinds (codes in KIND_CODES):
  char   n consecutive code points (default for Chinese);
  word   n consecutive whitespace-separated tokens (English);
  jieba  n consecutive jieba words (Chinese; the text is cut by jieba, then treated
         like `word`).
A document with fewer than n units but at least one gets exactly one shingle
covering all of it, so two equal short texts collide and two different ones do not.
A document with no unit (empty, or only spaces for word kinds) gets no shingle at all;
callers must leave it out of candidate search, otherwise every empty document would
share the all-maximum MinHash signature and look like a duplicate of every other.

All per-character work is numpy over the batch joined into one code-point array;
the only per-document Python is `len`, `lower` and jieba itself.
"""

from __future__ import annotations

import numpy as np

from dataproc.filters.charclass import CJK, LATIN, LETTER, SPACE, classify
from dataproc.near_dedup.config import ShingleConfig
from dataproc.near_dedup.hashing import csr_positions, fmix64, powers, splitmix64

KINDS = ("char", "word", "jieba")
KIND_CODES = {k: i for i, k in enumerate(KINDS)}
_P = 0x100000001B3  # FNV-64 prime: odd, hence invertible modulo 2**64
_P_INV = pow(_P, -1, 1 << 64)


def _codepoints(text: str) -> np.ndarray:
    # surrogatepass: a lone surrogate must not crash a GB-scale job.
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def detect_kinds(texts: list[str], sources: list | None, cfg: ShingleConfig) -> np.ndarray:
    """Kind code (int8) per document: per-source setting, else cfg.kind, else by script."""
    n = len(texts)
    out = np.full(n, KIND_CODES.get(cfg.kind, 0), dtype=np.int8)
    if cfg.kind == "auto" and n:
        lens = np.fromiter(map(len, texts), dtype=np.int64, count=n)
        cls = classify(_codepoints("".join(texts)))
        doc = np.repeat(np.arange(n), lens)
        cjk = np.bincount(doc[cls == CJK], minlength=n)
        letters = np.bincount(doc[(cls == CJK) | (cls == LATIN) | (cls == LETTER)], minlength=n)
        ratio = cjk / np.maximum(letters, 1)
        out = np.where(ratio >= cfg.cjk_ratio, KIND_CODES["char"], KIND_CODES["word"]).astype(np.int8)
    if cfg.per_source and sources is not None:
        for i, src in enumerate(sources):
            kind = cfg.per_source.get(src)
            if kind is not None:
                out[i] = KIND_CODES[kind]
    return out


def window_hashes(vals: np.ndarray, lens: np.ndarray, n: int, salt: np.uint64) -> tuple[np.ndarray, np.ndarray]:
    """Hash every window of n consecutive values inside each document.

    vals: (sum(lens),) uint64, the documents' units (code points or token hashes)
    back to back. Returns (hashes (N,), counts (n_docs,)) with max(len - n + 1, 1)
    windows per non-empty document (the short-document rule of the module doc).
    """
    lens = np.asarray(lens, dtype=np.int64)
    pad = n - 1
    # Each document is followed by n-1 zeros (no real unit is 0), so a window never
    # mixes two documents and a short document's one window is "its units + zeros".
    padstart = np.cumsum(lens + pad) - (lens + pad)
    size = int((lens + pad).sum())
    padded = np.zeros(size + 1, dtype=np.uint64)
    padded[csr_positions(padstart, lens)] = vals
    m = size - pad if size > pad else 0
    h = padded[:m].copy()
    with np.errstate(over="ignore"):
        for k, pk in enumerate(powers(_P, n)[1:], start=1):
            h += padded[k:k + m] * pk  # polynomial hash of the window, mod 2**64
    counts = np.where(lens > 0, np.maximum(lens - pad, 1), 0)
    out = h[csr_positions(padstart, counts)]
    out ^= salt
    return fmix64(out), counts


def _word_units(texts: list[str], salt: np.uint64) -> tuple[np.ndarray, np.ndarray]:
    """Token hashes (T,) uint64 and tokens per document, tokens = maximal runs of
    non-space characters. A token's hash is its substring's polynomial hash, taken
    from prefix sums so that no Python runs per token."""
    n = len(texts)
    lens = np.fromiter(map(len, texts), dtype=np.int64, count=n)
    cp = _codepoints("\n".join(texts))  # "\n" is a space: tokens never cross documents
    if cp.size == 0:
        return np.zeros(0, np.uint64), np.zeros(n, np.int64)
    word = classify(cp) != SPACE
    prev = np.concatenate(([False], word[:-1]))
    nxt = np.concatenate((word[1:], [False]))
    starts = np.flatnonzero(word & ~prev)
    ends = np.flatnonzero(word & ~nxt) + 1
    with np.errstate(over="ignore"):
        prefix = np.zeros(cp.size + 1, dtype=np.uint64)
        np.cumsum(cp.astype(np.uint64) * powers(_P, cp.size), out=prefix[1:])
        tok = (prefix[ends] - prefix[starts]) * powers(_P_INV, cp.size)[starts]
    tok ^= salt
    doc = np.repeat(np.arange(n), lens + 1)[starts]
    return fmix64(tok), np.bincount(doc, minlength=n)


def _jieba_texts(texts: list[str]) -> list[str]:
    import jieba  # imported lazily: loading its dictionary takes about a second

    jieba.setLogLevel(60)
    return [" ".join(w for w in jieba.lcut(t) if not w.isspace()) for t in texts]


def shingle_kind(texts: list[str], kind: str, cfg: ShingleConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shingle hashes of documents that all use one kind."""
    salt_unit, salt_window = splitmix64(seed * 8 + KIND_CODES[kind] + 1, 2)
    if cfg.lowercase:
        texts = [t.lower() for t in texts]
    if kind == "char":
        lens = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        units = _codepoints("".join(texts)).astype(np.uint64)
        return window_hashes(units, lens, cfg.char_ngram, salt_window)
    if kind == "jieba":
        texts = _jieba_texts(texts)
    units, lens = _word_units(texts, salt_unit)
    return window_hashes(units, lens, cfg.jieba_ngram if kind == "jieba" else cfg.word_ngram, salt_window)


def shingle_batch(texts: list[str], kinds: np.ndarray, cfg: ShingleConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shingle hashes (N,) uint64 and counts (n,) for documents of mixed kinds,
    in document order."""
    n = len(texts)
    counts = np.zeros(n, dtype=np.int64)
    parts = []
    for code in np.unique(kinds):
        idx = np.flatnonzero(kinds == code)
        h, c = shingle_kind([texts[i] for i in idx], KINDS[code], cfg, seed)
        counts[idx] = c
        parts.append((idx, h, c))
    if len(parts) == 1:
        return parts[0][1], counts
    offsets = np.cumsum(counts) - counts
    out = np.empty(int(counts.sum()), dtype=np.uint64)
    for idx, h, c in parts:
        out[csr_positions(offsets[idx], c)] = h
    return out, counts
