"""Small deterministic 64-bit hashing helpers over numpy arrays.

Everything near-dedup hashes must give the same value on every worker, in every
process and in every release: Python's `hash()` is salted per process and numpy's
random generators promise no stream stability, so the permutation coefficients and
shingle hashes come from splitmix64 / murmur3's finaliser implemented here. uint64
arithmetic wraps modulo 2**64 in numpy, which is exactly what these functions need.
"""

from __future__ import annotations

import hashlib

import numpy as np

M64 = (1 << 64) - 1
_C1, _C2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)


def fmix64(x: np.ndarray) -> np.ndarray:
    """murmur3's 64-bit finaliser (a bijection with full avalanche), in place on a
    uint64 array that the caller owns; also returned."""
    with np.errstate(over="ignore"):
        x ^= x >> _S33
        x *= _C1
        x ^= x >> _S33
        x *= _C2
        x ^= x >> _S33
    return x


def splitmix64(seed: int, n: int) -> np.ndarray:
    """n pseudo-random uint64 values from `seed` (Steele et al.'s splitmix64)."""
    out, state = [], seed & M64
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        out.append(z ^ (z >> 31))
    return np.array(out, dtype=np.uint64)


def powers(base: int, n: int) -> np.ndarray:
    """[1, base, base**2, ...] (n values) modulo 2**64."""
    out = np.ones(n, dtype=np.uint64)
    if n > 1:
        with np.errstate(over="ignore"):
            np.cumprod(np.full(n - 1, base, dtype=np.uint64), out=out[1:])
    return out


def stable_id64(values: list[str]) -> np.ndarray:
    """A stable signed 64-bit id per string (cluster ids in the audit output)."""
    return np.array([int.from_bytes(hashlib.blake2b(v.encode("utf-8"), digest_size=8).digest(), "little",
                                    signed=True) for v in values], dtype=np.int64)


def csr_positions(offsets: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenated ranges [offsets[i], offsets[i] + counts[i]) as one int64 array."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.cumsum(counts) - counts  # where range i begins in the output
    return np.arange(total, dtype=np.int64) + np.repeat(np.asarray(offsets, dtype=np.int64) - starts, counts)
