"""Verification of MinHash candidate pairs (no ray; job.py wires the two shuffles).

  requests  each candidate edge (a, b) asks both of its documents for their payload:
            rows (NODE=a, PA=a, PB=b) and (NODE=b, PA=a, PB=b)
  Attach    one hash partition of NODE: the corpus payload rows (NODE, TEXT, KIND,
            SIG) of its nodes plus the requests for them -> (PA, PB, SIDE, TEXT, KIND,
            SIG); a pair found in several bands meets itself here and is kept once
  Verify    one hash partition of (PA, PB): both sides of each pair -> the edge with
            both signatures (for the audit) if its similarity reaches the threshold:
            exact Jaccard of the shingle sets ("jaccard"), exact containment of the
            smaller set in the larger ("containment"), or the signature estimate of
            Jaccard ("signature").
Only the documents that are in some candidate pair travel beyond Attach.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dataproc.base import TEXT
from dataproc.filters.textstats import chunk_slices
from dataproc.near_dedup.config import NearDedupConfig, ShingleConfig
from dataproc.near_dedup.minhash import estimate_jaccard
from dataproc.near_dedup.shingles import shingle_batch
from dataproc.near_dedup.steps import KIND, NODE, SIG, A, B, binary_matrix, conform, edges_table

PA, PB, SIDE, JAC = "_nd_pa", "_nd_pb", "_nd_side", "_nd_jaccard"
# One schema for both sides of the Attach shuffle (see steps.conform).
ROUTE_SCHEMA = pa.schema([(NODE, pa.string()), (PA, pa.string()), (PB, pa.string()), (TEXT, pa.large_string()),
                          (KIND, pa.int8()), (SIG, pa.binary())])


def requests(edges: pa.Table) -> pa.Table:
    a, b = edges[A].combine_chunks(), edges[B].combine_chunks()
    both = pa.table({NODE: pa.concat_arrays([a, b]), PA: pa.concat_arrays([a, a]), PB: pa.concat_arrays([b, b])})
    return conform(both, ROUTE_SCHEMA)


def payload(with_text: bool):
    """Corpus rows -> the payload rows Attach needs (candidates only)."""
    cols = [NODE, TEXT, KIND, SIG] if with_text else [NODE, KIND, SIG]

    def project(table: pa.Table) -> pa.Table:
        return conform(table.select(cols).filter(pc.is_valid(table[SIG])), ROUTE_SCHEMA)

    return project


class Attach:
    def __init__(self, with_text: bool):
        self.cols = [PA, PB, SIDE] + ([TEXT] if with_text else []) + [KIND, SIG]

    def __call__(self, table: pa.Table) -> pa.Table:
        if PA not in table.column_names:
            return pa.table({c: [] for c in self.cols})
        is_req = pc.fill_null(pc.is_valid(table[PA]), False)
        req = table.filter(is_req).select([NODE, PA, PB]).to_pandas().drop_duplicates()
        docs = table.filter(pc.invert(is_req)).select([c for c in self.cols[3:]] + [NODE]).to_pandas()
        merged = req.merge(docs.drop_duplicates(NODE), on=NODE, how="inner")
        merged[SIDE] = (merged[NODE] == merged[PB]).astype(np.int8)
        return pa.Table.from_pandas(merged[self.cols], preserve_index=False)


def _overlap(texts_a: list[str], kinds_a: np.ndarray, texts_b: list[str], kinds_b: np.ndarray,
             cfg: ShingleConfig, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(|A∩B|, |A|, |B|) of the shingle (hash) sets of texts_a[i] and texts_b[i],
    vectorised: three (n,) int64 arrays.

    Two sorts of single uint64 keys (a lexsort of (hash, row) pairs took 3x as long,
    most of the job's CPU): the row (then the pair) replaces the low bits of each
    shingle hash, so sorting dedupes every text's set, then puts a shingle both texts
    of a pair hold next to itself. The high bits left (>= 40 for a million pairs)
    make a false match within one text or pair about as rare as a 64-bit collision
    over the whole batch."""
    n = len(texts_a)
    h, c = shingle_batch(texts_a + texts_b, np.concatenate([kinds_a, kinds_b]).astype(np.int8), cfg, seed)
    low = np.uint64((1 << max(1, int(2 * n - 1).bit_length())) - 1)
    high = ~low
    key = np.sort((h & high) | np.repeat(np.arange(2 * n, dtype=np.uint64), c))
    first = np.ones(len(key), dtype=bool)
    first[1:] = key[1:] != key[:-1]
    key = key[first]  # each text's shingles once
    row = (key & low).astype(np.int64)
    size = np.bincount(row, minlength=2 * n)
    key = np.sort((key & high) | (row % n).astype(np.uint64))
    both = key[1:] == key[:-1]  # distinct within a text, so an equal neighbour is the pair's other text
    return np.bincount((key[1:][both] & low).astype(np.int64), minlength=n), size[:n], size[n:]


def exact_jaccard(texts_a: list[str], kinds_a: np.ndarray, texts_b: list[str], kinds_b: np.ndarray,
                  cfg: ShingleConfig, seed: int) -> np.ndarray:
    """Jaccard |A∩B| / |A∪B| of the shingle (hash) sets of texts_a[i] and texts_b[i]:
    (n,) float64. Equal to the Jaccard of the shingle strings up to 64-bit collisions."""
    inter, size_a, size_b = _overlap(texts_a, kinds_a, texts_b, kinds_b, cfg, seed)
    union = size_a + size_b - inter
    return np.divide(inter, union, out=np.zeros(len(inter)), where=union > 0)


def exact_containment(texts_a: list[str], kinds_a: np.ndarray, texts_b: list[str], kinds_b: np.ndarray,
                      cfg: ShingleConfig, seed: int) -> np.ndarray:
    """Containment of the smaller shingle set in the larger: |A∩B| / min(|A|, |B|),
    (n,) float64. Symmetric (the job's pairs are ordered by keep order, not size), and
    1.0 for an excerpt copied whole into a longer document, whose Jaccard is only
    about its share of the longer one."""
    inter, size_a, size_b = _overlap(texts_a, kinds_a, texts_b, kinds_b, cfg, seed)
    small = np.minimum(size_a, size_b)
    return np.divide(inter, small, out=np.zeros(len(inter)), where=small > 0)


EXACT = {"jaccard": exact_jaccard, "containment": exact_containment}
# Candidates whose signature estimate lies this many standard deviations below the
# Jaccard threshold are not checked exactly (most candidates of a low LSH centre).
SKIP_SIGMAS = 6.0


def exact_check_floor(threshold: float, num_perm: int, sigmas: float = SKIP_SIGMAS) -> float:
    """The estimate below which a pair cannot plausibly reach `threshold`: the
    estimate of k permutations is a binomial share with sd sqrt(J(1-J)/k), largest
    over J >= threshold at J = threshold (or 0.5), so a pair at or above the threshold
    falls under this floor with a probability of a `sigmas`-sigma tail (~1e-9 at 6)."""
    var = threshold * (1 - threshold) if threshold >= 0.5 else 0.25
    return threshold - sigmas * math.sqrt(var / num_perm)


class Verify:
    def __init__(self, cfg: NearDedupConfig):
        self.cfg = cfg

    def __call__(self, table: pa.Table) -> pa.Table:
        mode, t = self.cfg.minhash.verify, self.cfg.minhash.threshold
        if len(table) == 0:
            return edges_table([], [], [], []).append_column(JAC, pa.array([], pa.float64()))
        df = table.to_pandas().sort_values([PA, PB, SIDE]).drop_duplicates([PA, PB, SIDE])
        sizes = df.groupby([PA, PB], sort=False)[SIDE].transform("size").to_numpy()
        df = df[sizes == 2]  # both documents found (always, unless the input changed under us)
        s0, s1 = df.iloc[0::2], df.iloc[1::2]
        sig0 = binary_matrix(pa.array(s0[SIG].tolist(), pa.binary()), np.uint32)
        sig1 = binary_matrix(pa.array(s1[SIG].tolist(), pa.binary()), np.uint32)
        j = estimate_jaccard(sig0, sig1) if len(s0) else np.zeros(0)
        if mode in EXACT:
            # Containment can be high where Jaccard is low: only Jaccard skips by estimate.
            check = (j >= exact_check_floor(t, self.cfg.minhash.num_perm) if mode == "jaccard"
                     else np.ones(len(j), dtype=bool))
            idx = np.flatnonzero(check)
            t0, t1 = s0[TEXT].to_numpy(object)[idx].tolist(), s1[TEXT].to_numpy(object)[idx].tolist()
            k0, k1 = s0[KIND].to_numpy(np.int8)[idx], s1[KIND].to_numpy(np.int8)[idx]
            exact = EXACT[mode]
            j = j.copy()  # unchecked pairs keep their estimate, below the threshold
            if len(idx):
                j[idx] = np.concatenate([exact(t0[p], k0[p], t1[p], k1[p], self.cfg.shingles, self.cfg.seed)
                                         for p in chunk_slices([a + b for a, b in zip(t0, t1)])])
        keep = np.ones(len(j), dtype=bool) if mode == "none" else j >= t
        out = edges_table(s0[PA].to_numpy(object)[keep], s0[PB].to_numpy(object)[keep],
                          s0[SIG].to_numpy(object)[keep], s1[SIG].to_numpy(object)[keep])
        return out.append_column(JAC, pa.array(j[keep], pa.float64()))
