"""Graph pieces of near-dedup on plain numpy arrays (no ray): bucket stars, the
pigeonhole Hamming check, connected components inside one partition, and the
large-star / small-star steps of the distributed components algorithm.

Nodes are strings whose order is the keep order (see steps.node_keys); inside a
partition they are factorised to int codes with `sort=True`, so "smaller code" means
"kept first" and every choice is independent of row order.

Distributed components (Kiveris et al., "Connected Components in MapReduce and
Beyond", 2014): alternate
  large-star: every node u links each neighbour v > u to m(u) = min(u, N(u));
  small-star: every node u links itself and each neighbour v < u to
              m(u) = min(u, {v in N(u): v < u}).
Each step only needs, per node, its own edge list, i.e. one hash shuffle by node.
When a large-star and the following small-star change nothing, every component is
a star around its minimum node: the edges are exactly (kept, removed) pairs.
O(log^2 n) rounds are proven; in practice a handful.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dataproc.near_dedup.hashing import csr_positions


def factorize(*columns: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Order-preserving int codes for several string columns over one shared
    vocabulary: ([codes per column], uniques)."""
    sizes = [len(c) for c in columns]
    codes, uniques = pd.factorize(np.concatenate(columns) if columns else np.zeros(0, object), sort=True)
    return list(np.split(codes.astype(np.int64), np.cumsum(sizes)[:-1])), np.asarray(uniques, dtype=object)


def group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Bool (n,): True where a run of equal keys begins."""
    first = np.ones(len(sorted_keys), dtype=bool)
    if len(sorted_keys) > 1:
        first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return first


def bucket_stars(bkeys: np.ndarray, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows (bucket key, node) -> star edges (center, member) with center = the
    bucket's smallest node: len(bucket) - 1 edges per bucket, never all pairs."""
    if len(nodes) < 2:
        return np.zeros(0, object), np.zeros(0, object)
    (codes,), _ = factorize(nodes)
    order = np.lexsort((codes, bkeys))  # by bucket, then keep order inside a bucket
    k, c, v = bkeys[order], codes[order], nodes[order]
    keep = np.ones(len(k), dtype=bool)  # a node twice in one bucket (retried rows): once
    keep[1:] = (k[1:] != k[:-1]) | (c[1:] != c[:-1])
    k, v = k[keep], v[keep]
    first = group_starts(k)
    center = np.maximum.accumulate(np.where(first, np.arange(len(k)), 0))
    return v[center[~first]], v[~first]


def components(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """Component label (= smallest node code in it) of each of n nodes, edges a-b.
    Min-label propagation with pointer jumping: labels only decrease and stay inside
    the component, and the smallest node keeps its own label, so the fixpoint is it."""
    label = np.arange(n, dtype=np.int64)
    while True:
        m = np.minimum(label[a], label[b])
        new = label.copy()
        np.minimum.at(new, a, m)
        np.minimum.at(new, b, m)
        while True:  # pointer jumping: follow labels to their own labels
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, label):
            return label
        label = new


def star_step(src: np.ndarray, dst: np.ndarray, n: int, large: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """One large-star or small-star step over directed edges (both directions present,
    no duplicates) of node codes. Returns undirected edges (lo, hi) with lo < hi and
    the number of nodes whose neighbourhood was not yet a finished star."""
    ids = np.arange(n, dtype=np.int64)
    if large:
        m = ids.copy()
        np.minimum.at(m, src, dst)  # m(u) = min(u, all neighbours)
        sel = dst > src
        lo, hi = m[src[sel]], dst[sel]
        changed = np.unique(src[sel][m[src[sel]] < src[sel]]).size
    else:
        sel = dst < src
        m = ids.copy()
        np.minimum.at(m, src[sel], dst[sel])  # m(u) = min(u, smaller neighbours)
        s, d = src[sel], dst[sel]
        keep = d != m[s]
        own = np.flatnonzero(m < ids)  # u itself links to m(u)
        lo = np.concatenate((m[s[keep]], m[own]))
        hi = np.concatenate((d[keep], own))
        changed = int((np.bincount(s, minlength=n) >= 2).sum())
    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    return lo, hi, int(changed)


def dedupe_pairs(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(lo) == 0:
        return lo, hi
    pairs = np.unique(np.stack([lo, hi], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def close_pairs(bkeys: np.ndarray, fps: np.ndarray, max_distance: int,
                max_pairs: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j), i < j, of rows in the same bucket whose fingerprints are
    within max_distance bits. Rows must be sorted by bucket key. Pairs are generated
    per run of left rows so at most ~max_pairs are held at once."""
    n = len(bkeys)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    first = group_starts(bkeys)
    gid = np.cumsum(first) - 1
    gstart = np.flatnonzero(first)
    gend = np.append(gstart[1:], n)
    later = gend[gid] - np.arange(n) - 1  # (n,) rows after me in my bucket
    out_i, out_j = [], []
    cum = np.cumsum(later)
    lo = 0
    while lo < n:
        hi = int(np.searchsorted(cum, (cum[lo - 1] if lo else 0) + max_pairs, side="right"))
        hi = max(hi, lo + 1)
        rows = np.arange(lo, min(hi, n))
        i = np.repeat(rows, later[rows])
        j = csr_positions(rows + 1, later[rows])
        close = np.bitwise_count(np.bitwise_xor(fps[i], fps[j])) <= max_distance
        out_i.append(i[close])
        out_j.append(j[close])
        lo = hi
    return np.concatenate(out_i), np.concatenate(out_j)
