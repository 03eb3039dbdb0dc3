"""64-bit SimHash fingerprints over weighted shingles, and pigeonhole block keys.

fingerprint bit j = 1 iff the sum over the document's shingles of w * (+1 if bit j of
the shingle's hash is 1 else -1) is positive. Weights: 1 per occurrence ("count") or
occurrence times idf of the shingle ("tfidf", idf looked up in a hashed table built in
one pass over the corpus, see `idf_table`).

Candidate search: two fingerprints within Hamming distance k agree exactly on at
least one of k+1 disjoint bit blocks (pigeonhole), so each block value (block index
mixed in) is a bucket key; candidates in a bucket are then checked exactly
(`hamming`), no false positives survive.
"""

from __future__ import annotations

import numpy as np

from dataproc.near_dedup.hashing import fmix64, splitmix64

BITS = 64


def fingerprints(hashes: np.ndarray, counts: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """(n_docs,) uint64 from CSR shingle hashes; weights (N,) float or None (= 1)."""
    counts = np.asarray(counts, dtype=np.int64)
    n = len(counts)
    out = np.zeros(n, dtype=np.uint64)
    docs = np.flatnonzero(counts)
    if len(docs) == 0:
        return out
    starts = (np.cumsum(counts) - counts)[docs]
    # (N, 64) bits, bit j of byte-order little = bit j of the integer.
    bits = np.unpackbits(hashes.astype("<u8").view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
    if weights is None:
        ones = np.add.reduceat(bits, starts, axis=0, dtype=np.int64)  # (k, 64)
        total = counts[docs][:, None]
    else:
        w = np.asarray(weights, dtype=np.float64)
        ones = np.add.reduceat(bits * w[:, None], starts, axis=0)
        total = np.add.reduceat(w, starts)[:, None]
    # sum of w*(2*bit - 1) > 0  <=>  2 * sum(w*bit) > sum(w)
    packed = np.packbits(2 * ones > total, axis=1, bitorder="little")  # (k, 8) uint8
    out[docs] = packed.reshape(-1).view("<u8")
    return out


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(a, b))


def block_layout(k: int) -> list[tuple[int, int]]:
    """k+1 (shift, width) bit blocks covering all 64 bits, widths as equal as possible."""
    nb = k + 1
    widths = [BITS // nb + (1 if i < BITS % nb else 0) for i in range(nb)]
    shifts = np.cumsum([0] + widths[:-1]).tolist()
    return list(zip(shifts, widths))


def block_keys(fp: np.ndarray, k: int, seed: int = 1) -> np.ndarray:
    """(n,) uint64 fingerprints -> (n, k+1) uint64 bucket keys."""
    layout = block_layout(k)
    salts = splitmix64(0xB10C0000 + seed, len(layout))
    cols = []
    for (shift, width), salt in zip(layout, salts):
        mask = np.uint64((1 << width) - 1)
        cols.append(((fp >> np.uint64(shift)) & mask) ^ salt)
    return fmix64(np.stack(cols, axis=1))


def estimate_jaccard(distance: np.ndarray) -> np.ndarray:
    """Jaccard implied by a Hamming distance, for unweighted sets of equal size:
    angle = pi * d / 64, cosine = 2J / (1 + J)  =>  J = cos / (2 - cos)."""
    cos = np.cos(np.pi * np.asarray(distance, dtype=np.float64) / BITS)
    return np.clip(cos / (2 - cos), 0.0, 1.0)


def idf_counts(hashes: np.ndarray, counts: np.ndarray, buckets: int) -> np.ndarray:
    """Document frequency per hashed bucket over one batch: (buckets,) int64. Summed
    over the corpus this gives the idf table (collisions only blur rare shingles)."""
    doc = np.repeat(np.arange(len(counts)), counts)
    key = (hashes % np.uint64(buckets)).astype(np.int64)
    pairs = np.unique(doc.astype(np.int64) * buckets + key)  # one count per (doc, bucket)
    return np.bincount(pairs % buckets, minlength=buckets)


def idf_table(df: np.ndarray, n_docs: int) -> np.ndarray:
    """Smoothed idf per bucket: log((1 + n) / (1 + df)) + 1 (scikit-learn's)."""
    return (np.log((1.0 + n_docs) / (1.0 + df)) + 1.0).astype(np.float32)
