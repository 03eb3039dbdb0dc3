"""Connected components of the duplicate graph, distributed over Ray Data.

Input: a materialized dataset of undirected edges (A, B, SIG_A, SIG_B), A < B.
Output: a materialized dataset of (A = kept node, B = removed node, SIG_A, SIG_B),
one row per removed document, A being the smallest node of B's component.

Two paths, same result:
  * up to `local_components_max_edges` edges: ONE worker task (repartition(1))
    runs graph.components over all edges;
  * above: large-star / small-star rounds (graph.py), each step one hash shuffle of
    the edges by source node, until a round changes nothing (at most max_rounds).
Either way the driver only sees counts: never an edge.
Each edge row carries both nodes' signatures so the audit can estimate the Jaccard
of (removed, kept) without joining the corpus again.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute in the remote task)

from dataproc.near_dedup import graph
from dataproc.near_dedup.steps import A, B, SIG_A, SIG_B, edges_table

SRC, DST, PSRC, PDST, CHANGES = "_nd_src", "_nd_dst", "_nd_psrc", "_nd_pdst", "_nd_changes"


class ComponentsDidNotConverge(RuntimeError):
    pass


def _payloads(n: int, codes: list[np.ndarray], sigs: list) -> np.ndarray:
    pay = np.empty(n, dtype=object)
    for c, s in zip(codes, sigs):
        pay[c] = s
    return pay


def local_components(table: pa.Table) -> pa.Table:
    """All edges in one block -> (kept, removed) star edges."""
    if len(table) == 0:
        return edges_table([], [], [], [])
    (a, b), uniq = graph.factorize(table[A].to_numpy(zero_copy_only=False), table[B].to_numpy(zero_copy_only=False))
    pay = _payloads(len(uniq), [a, b], [table[SIG_A].to_numpy(zero_copy_only=False),
                                        table[SIG_B].to_numpy(zero_copy_only=False)])
    label = graph.components(a, b, len(uniq))
    leaf = np.flatnonzero(label != np.arange(len(uniq)))
    return edges_table(uniq[label[leaf]], uniq[leaf], pay[label[leaf]], pay[leaf])


def directed(table: pa.Table) -> pa.Table:
    """Undirected edges -> both directions, so a shuffle by SRC gives every node its
    whole neighbourhood."""
    a, b = table[A].combine_chunks(), table[B].combine_chunks()
    sa, sb = table[SIG_A].combine_chunks(), table[SIG_B].combine_chunks()
    return pa.table({SRC: pa.concat_arrays([a, b]), DST: pa.concat_arrays([b, a]),
                     PSRC: pa.concat_arrays([sa, sb]), PDST: pa.concat_arrays([sb, sa])})


class StarStep:
    """One hash partition of directed edges by SRC -> the large-star (or small-star)
    output edges, plus CHANGES (nodes not yet finished) on the first row."""

    def __init__(self, large: bool):
        self.large = large

    def __call__(self, table: pa.Table) -> pa.Table:
        if len(table) == 0:
            return edges_table([], [], [], []).append_column(CHANGES, pa.array([], pa.int64()))
        col = lambda name: table[name].to_numpy(zero_copy_only=False)  # noqa: E731
        (s, d), uniq = graph.factorize(col(SRC), col(DST))
        pay = _payloads(len(uniq), [s, d], [col(PSRC), col(PDST)])
        s, d = graph.dedupe_pairs(s, d)  # the same edge may have come from several partitions
        lo, hi, changed = graph.star_step(s, d, len(uniq), self.large)
        lo, hi = graph.dedupe_pairs(lo, hi)
        changes = np.zeros(len(lo), dtype=np.int64)
        if len(lo):
            changes[0] = changed
        return edges_table(uniq[lo], uniq[hi], pay[lo], pay[hi]).append_column(CHANGES, pa.array(changes))


def _count_changes(ds) -> int:
    """Sum of CHANGES over a materialized dataset: one tiny task per block returning
    an int (cheaper than a Ray Data aggregation, which needs its own shuffle)."""
    import ray

    @ray.remote(num_cpus=0.5)
    def count(block) -> int:
        return int(pa.compute.sum(block[CHANGES]).as_py() or 0) if len(block) else 0

    refs = [getattr(e, "ref", None) or e[0] for bundle in ds.iter_internal_ref_bundles() for e in bundle.blocks]
    return sum(ray.get([count.remote(ref) for ref in refs]))


def connected_components(edges, *, parts: int, max_local_edges: int, max_rounds: int, info: dict):
    """edges: materialized Dataset of (A, B, SIG_A, SIG_B). Returns the materialized
    (kept, removed) dataset. `info` gets the path taken and the rounds run."""
    n_edges = edges.count()
    if n_edges <= max_local_edges:
        info["components"] = {"path": "local", "edges": n_edges}
        return edges.repartition(1).map_batches(local_components, batch_size=None,
                                                batch_format="pyarrow").materialize()
    keep = [A, B, SIG_A, SIG_B]
    for rnd in range(1, max_rounds + 1):
        changed = 0
        for large in (True, False):
            edges = (edges.select_columns(keep).map_batches(directed, batch_format="pyarrow")
                     .repartition(parts, keys=[SRC])
                     .map_batches(StarStep(large), batch_size=None, batch_format="pyarrow").materialize())
            changed += _count_changes(edges)
        if changed == 0:
            info["components"] = {"path": "distributed", "edges": n_edges, "rounds": rnd}
            return edges.select_columns(keep).materialize()
    raise ComponentsDidNotConverge(
        f"connected components did not converge in {max_rounds} rounds; raise near_dedup.max_rounds")
