"""MinHash signatures over whole batches, LSH band keys, and the band layout.

Signature: for permutation i, h_i(x) = (a_i * x + b_i) mod 2**32 over the 32-bit
shingle hashes x (the top half of the 64-bit shingle hash), with a_i odd, and
sig[d, i] = min over the shingles x of document d of h_i(x). Each h_i is a bijection
of the 32-bit integers, i.e. a random-looking permutation; P(sig_A[i] == sig_B[i]) is
the Jaccard similarity of the shingle sets up to 32-bit hash collisions, like
datasketch's (a*x + b) mod (2**61 - 1) truncated to 32 bits.

Why it is fast in numpy: the work is one (num_perm, chunk) uint32 multiply, one add
and one `minimum.reduceat` along contiguous rows per chunk of ~4k shingles, so every
pass runs in SIMD over a cache-sized buffer; no Python runs per shingle or document.

LSH: the first bands*rows values are cut into `bands` bands of `rows`; each band
becomes one uint64 bucket key (band index mixed in, so bands never share buckets).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from dataproc.near_dedup.hashing import fmix64, powers, splitmix64

EMPTY = np.uint32(0xFFFFFFFF)
CHUNK = 4096  # shingles per vectorised step: (num_perm, CHUNK) uint32 = 2 MiB at 128


class MinHasher:
    def __init__(self, num_perm: int = 128, seed: int = 1):
        coeffs = splitmix64(0x5EED0000 + seed, 2 * num_perm)
        self.num_perm = num_perm
        self.a = ((coeffs[:num_perm] >> np.uint64(32)) | np.uint64(1)).astype(np.uint32)[:, None]  # (P, 1) odd
        self.b = (coeffs[num_perm:] >> np.uint64(32)).astype(np.uint32)[:, None]  # (P, 1)

    def signatures(self, hashes: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """(n_docs, num_perm) uint32 from CSR shingle hashes (uint64). Documents
        without shingles get EMPTY everywhere (callers leave them out of LSH)."""
        counts = np.asarray(counts, dtype=np.int64)
        n, total = len(counts), int(counts.sum())
        sig_t = np.full((self.num_perm, n), EMPTY, dtype=np.uint32)  # (P, n): rows are contiguous
        if total == 0:
            return sig_t.T.copy()
        x = (hashes >> np.uint64(32)).astype(np.uint32)
        docs = np.flatnonzero(counts)
        starts = (np.cumsum(counts) - counts)[docs]  # (k,) first shingle of each non-empty doc
        buf = np.empty((self.num_perm, CHUNK), dtype=np.uint32)
        for i0 in range(0, total, CHUNK):
            i1 = min(total, i0 + CHUNK)
            b = buf[:, : i1 - i0]
            np.multiply(self.a, x[i0:i1], out=b)  # (P, c) wraps mod 2**32
            b += self.b
            d0 = np.searchsorted(starts, i0, side="right") - 1  # doc holding shingle i0
            d1 = np.searchsorted(starts, i1, side="left")  # docs starting before i1
            seg = np.maximum(starts[d0:d1], i0) - i0
            mins = np.minimum.reduceat(b, seg, axis=1)  # (P, d1 - d0)
            cols = docs[d0:d1]
            # Only the first segment can continue a document from the previous chunk.
            sig_t[:, cols[0]] = np.minimum(sig_t[:, cols[0]], mins[:, 0])
            sig_t[:, cols[1:]] = mins[:, 1:]
        return np.ascontiguousarray(sig_t.T)


def estimate_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Share of equal signature values: (..., P) x (..., P) -> (...)."""
    return (a == b).mean(axis=-1)


def band_keys(sig: np.ndarray, bands: int, rows: int, seed: int = 1) -> np.ndarray:
    """(n, num_perm) uint32 -> (n, bands) uint64 bucket keys."""
    n = sig.shape[0]
    v = sig[:, : bands * rows].reshape(n, bands, rows).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = (v * powers(0x9E3779B97F4A7C15, rows)).sum(axis=2, dtype=np.uint64)  # (n, bands), wraps
        h ^= splitmix64(0xBA4D0000 + seed, bands)[None, :]  # band salt: bands never share a bucket
    return fmix64(h)


def _areas(threshold: float, b: int, r: int, grid: int = 4001) -> tuple[float, float]:
    """False-positive area ∫_0^t P(s) ds and false-negative area ∫_t^1 (1 - P(s)) ds
    of the S-curve P(s) = 1 - (1 - s^r)^b (composite Simpson, grid points odd)."""
    def simpson(lo, hi, f):
        s = np.linspace(lo, hi, grid)
        y = f(s)
        h = (hi - lo) / (grid - 1)
        return h / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum())

    fp = simpson(0.0, threshold, lambda s: 1 - (1 - s ** r) ** b)
    fn = simpson(threshold, 1.0, lambda s: (1 - s ** r) ** b)
    return float(fp), float(fn)


@lru_cache(maxsize=256)
def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimising
    fp_weight * FP area + fn_weight * FN area: the same objective datasketch's
    MinHashLSH minimises (it integrates with scipy's quad; Simpson on 4001 points
    agrees to ~1e-9, far below the gaps between layouts)."""
    best, best_err = (1, 1), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp, fn = _areas(threshold, b, r)
            err = fp * fp_weight + fn * fn_weight
            if err < best_err:
                best, best_err = (b, r), err
    return best


def candidate_probability(s: np.ndarray | float, bands: int, rows: int):
    """Probability that two documents of Jaccard s share at least one band."""
    return 1 - (1 - np.asarray(s, dtype=np.float64) ** rows) ** bands
