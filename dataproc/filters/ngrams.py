"""Batch-wide duplicate detection for the repetition filter (Gopher statistics).

Everything is computed for a whole batch of documents at once: words are 64-bit ids
(hashes), n-grams are polynomial hashes of word ids salted with the document index,
and `pd.factorize` (a hash table, in C) finds repeats; factorize numbers keys in order
of first appearance, so an occurrence is a repeat iff its code is not a new maximum.
A k-gram can only occur twice where both of its (k-1)-grams do, so after k=3 almost
every position is pruned and larger k cost next to nothing.
"""

from __future__ import annotations

from itertools import chain

import numpy as np
import pandas as pd

from dataproc.filters.textstats import safe_div

_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constants for the polynomial hash
_SALT = np.uint64(0xC2B2AE3D27D4EB4F)


def repeats(keys: np.ndarray, doc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, is_repeat) of keys salted with their document (same key in two
    documents is no repetition)."""
    salted = keys * _MUL + doc.astype(np.uint64) * _SALT
    codes, _ = pd.factorize(salted, sort=False)
    seen = np.maximum.accumulate(codes)
    repeat = np.zeros(len(codes), dtype=bool)
    repeat[1:] = codes[1:] <= seen[:-1]
    return codes, repeat


def dup_fracs(items: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Per document: (duplicate item fraction, duplicate item char fraction)."""
    n = len(items)
    flat = list(chain.from_iterable(items))
    doc = np.repeat(np.arange(n), np.fromiter(map(len, items), dtype=np.int64, count=n))
    if not flat:
        return np.zeros(n), np.zeros(n)
    lens = np.fromiter(map(len, flat), dtype=np.float64, count=len(flat))
    _, rep = repeats(pd.util.hash_array(np.array(flat, dtype=object)), doc)
    frac = safe_div(np.bincount(doc, weights=rep, minlength=n), np.bincount(doc, minlength=n))
    char_frac = safe_div(np.bincount(doc, weights=lens * rep, minlength=n), np.bincount(doc, weights=lens, minlength=n))
    return frac, char_frac


def ngram_fracs(doc: np.ndarray, ids: np.ndarray, lens: np.ndarray, frac: dict) -> None:
    """Fill frac[kind, k] (arrays over documents) from the batch's tokens (document,
    64-bit id, char length; in document order): "top" = chars of the most frequent
    k-gram (count >= 2) times its count / chars, "dup" = chars covered by repeated
    k-gram occurrences / chars."""
    n, n_ids = len(next(iter(frac.values()))), len(ids)
    total = np.bincount(doc, weights=lens, minlength=n)
    cum = np.concatenate(([0.0], np.cumsum(lens)))  # chars of tokens [a, b) = cum[b] - cum[a]
    codes, _ = repeats(ids, doc)
    multi = np.bincount(codes)[codes] >= 2  # the (k-1)-gram at i occurs twice in its doc
    start = np.arange(n_ids)  # candidate positions; h is valid there
    h = ids.copy()  # hash of the k-gram starting at i
    for k in range(2, max(k for _, k in frac) + 1):
        # A k-gram can only occur twice where both of its (k-1)-grams do: this prunes
        # almost every position after k=3, exactly (all occurrences stay candidates).
        start = start[start + k - 1 < n_ids]
        start = start[multi[start] & multi[start + 1] & (doc[start] == doc[start + k - 1])]
        if not len(start):
            break
        h[start] = h[start] * _MUL + ids[start + k - 1]
        d = doc[start]
        codes, rep = repeats(h[start], d)
        count = np.bincount(codes)
        multi = np.zeros(n_ids, dtype=bool)
        multi[start] = count[codes] >= 2
        if ("top", k) in frac:
            # Per k-gram (code order = first occurrences in order): doc, chars, count;
            # per doc the most frequent one (ties: the longest), if it occurs twice.
            first = start[~rep]
            g = np.flatnonzero(count >= 2)
            g_doc, g_chars = doc[first[g]], cum[first[g] + k] - cum[first[g]]
            order = np.lexsort((g_chars, count[g], g_doc))
            last = np.ones(len(order), dtype=bool)
            last[:-1] = g_doc[order][1:] != g_doc[order][:-1]
            best = order[last]
            frac["top", k][g_doc[best]] = count[g][best] * g_chars[best] / total[g_doc[best]]
        if ("dup", k) in frac:
            # Chars covered by the union of repeated occurrences [s, s + k): sorted,
            # equal-length intervals, each adds what lies beyond the previous one's end.
            s = start[rep]
            lo = np.maximum(s, np.concatenate(([0], s[:-1] + k)))
            covered = np.bincount(doc[s], weights=cum[s + k] - cum[lo], minlength=n)
            frac["dup", k][:] = safe_div(covered, total)
