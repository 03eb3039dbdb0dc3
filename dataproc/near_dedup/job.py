"""Near-duplicate removal wired into Ray Data: the step of `zerolm data run`.

    corpus ──Signer──► signed (materialized: corpus + NODE, SIG, KIND)
      MinHash: signed ─Bander─► band rows ─shuffle(BKEY)─► star edges ─requests─┐
               signed ─payload (candidates' text+sig)───────────────────────────┴► shuffle(NODE)
               ─Attach─► shuffle(PA, PB) ─Verify─► verified edges
      SimHash: signed ─Bander─► block rows ─shuffle(BKEY)─► Hamming-checked star edges
      edges ─connected_components─► (kept, removed) ─► duplicates/*.parquet (workers write)
      signed + removal markers ─shuffle(NODE)─Mark─► corpus rows, removed ones
                                                      DROP = "near_dedup:near_duplicate"

Every arrow runs on the workers. The driver holds configs, the band layout, counts,
and (SimHash tf-idf only) the idf table of `idf_buckets` floats; never documents,
signatures or edges.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dataproc.base import live_mask, TEXT
from dataproc.near_dedup import simhash
from dataproc.near_dedup.components import connected_components
from dataproc.near_dedup.config import NearDedupConfig
from dataproc.near_dedup.hashing import stable_id64
from dataproc.near_dedup.minhash import estimate_jaccard, optimal_bands
from dataproc.near_dedup.shingles import detect_kinds, shingle_batch
from dataproc.near_dedup.steps import (
    A, B, BKEY, HELPER_COLUMNS, NODE, SIG_A, SIG_B, Bander, Conform, Mark, Markers, MinHashBuckets, Signer,
    SimHashBuckets, binary_matrix, node_to_id,
)
from dataproc.near_dedup.verify import EXACT, PA, PB, Attach, Verify, payload, requests

DUPLICATES_DIR = "duplicates"
AUDIT_SCHEMA = pa.schema([("removed_id", pa.string()), ("kept_id", pa.string()), ("cluster_id", pa.int64()),
                          ("estimated_jaccard", pa.float64())])


def band_layout(cfg: NearDedupConfig) -> tuple[int, int]:
    m = cfg.minhash
    if m.bands is not None:
        return m.bands, m.rows
    return optimal_bands(round(m.lsh_threshold(), 6), m.num_perm, m.fp_weight, 1 - m.fp_weight)


class Audit:
    """(kept, removed) edges -> audit rows (removed_id, kept_id, cluster_id, estimated_jaccard)."""

    def __init__(self, cfg: NearDedupConfig):
        self.keep, self.method = cfg.keep, cfg.method

    def __call__(self, table: pa.Table) -> pa.Table:
        kept = node_to_id(table[A].to_pylist(), self.keep)
        if self.method == "minhash":
            est = estimate_jaccard(binary_matrix(table[SIG_A], np.uint32), binary_matrix(table[SIG_B], np.uint32))
        else:
            fa, fb = binary_matrix(table[SIG_A], np.uint64), binary_matrix(table[SIG_B], np.uint64)
            est = simhash.estimate_jaccard(simhash.hamming(fa, fb).reshape(-1))
        return pa.table({"removed_id": node_to_id(table[B].to_pylist(), self.keep), "kept_id": kept,
                         "cluster_id": stable_id64(kept), "estimated_jaccard": np.asarray(est, np.float64)},
                        schema=AUDIT_SCHEMA)


class IdfCounts:
    """Corpus batch -> (bucket, df) rows of hashed document frequencies; bucket -1
    holds the number of documents."""

    def __init__(self, cfg: NearDedupConfig):
        self.cfg = cfg

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        idx = np.flatnonzero(live_mask(batch))
        texts = batch[TEXT].iloc[idx].astype(str).tolist()
        kinds = detect_kinds(texts, batch["source"].iloc[idx].astype(str).tolist() if "source" in batch else None,
                             self.cfg.shingles)
        h, c = shingle_batch(texts, kinds, self.cfg.shingles, self.cfg.seed)
        df = simhash.idf_counts(h, c, self.cfg.simhash.idf_buckets)
        nz = np.flatnonzero(df)
        return pd.DataFrame({"bucket": np.append(nz, -1), "df": np.append(df[nz], int((c > 0).sum()))})


def _idf(ds, cfg: NearDedupConfig, batch_size: int) -> np.ndarray:
    totals = ds.map_batches(IdfCounts(cfg), batch_size=batch_size, batch_format="pandas").groupby("bucket").sum("df")
    df = np.zeros(cfg.simhash.idf_buckets, dtype=np.int64)
    n_docs = 0
    for b in totals.iter_batches(batch_size=1 << 16, batch_format="numpy"):  # streaming: memory stays flat
        bucket, count = b["bucket"], b["sum(df)"]
        n_docs += int(count[bucket < 0].sum())
        df[bucket[bucket >= 0]] = count[bucket >= 0]
    return simhash.idf_table(df, n_docs)


def _candidate_edges(signed, cfg: NearDedupConfig, parts: int, info: dict):
    """Verified duplicate edges (A, B, SIG_A, SIG_B), materialized."""
    if cfg.method == "simhash":
        return (signed.map_batches(Bander(cfg), batch_size=4096, batch_format="pyarrow")
                .repartition(parts, keys=[BKEY])
                .map_batches(SimHashBuckets(cfg.simhash.max_distance), batch_size=None, batch_format="pyarrow")
                .materialize())
    bands, rows = band_layout(cfg)
    info.update(bands=bands, rows=rows, lsh_threshold=cfg.minhash.lsh_threshold())
    # Materialized after every shuffle: several hash-shuffle operators alive in one
    # streaming plan each hold aggregator actors, and on a small cluster (2 CPUs) they
    # starve each other's map tasks and the job hangs.
    star = (signed.map_batches(Bander(cfg, bands, rows), batch_size=4096, batch_format="pyarrow")
            .repartition(parts, keys=[BKEY])
            .map_batches(MinHashBuckets(), batch_size=None, batch_format="pyarrow").materialize())
    with_text = cfg.minhash.verify in EXACT  # exact checks (jaccard, containment) re-shingle the texts
    pay = signed.map_batches(payload(with_text), batch_size=4096, batch_format="pyarrow")
    attached = (star.map_batches(requests, batch_format="pyarrow").union(pay)
                .repartition(parts, keys=[NODE])
                .map_batches(Attach(with_text), batch_size=None, batch_format="pyarrow").materialize())
    return (attached.repartition(parts, keys=[PA, PB])
            .map_batches(Verify(cfg), batch_size=None, batch_format="pyarrow")
            .select_columns([A, B, SIG_A, SIG_B]).materialize())


def _drop_helpers(table: pa.Table) -> pa.Table:
    return table.drop_columns([c for c in HELPER_COLUMNS if c in table.column_names])


def near_dedup(ds, cfg: NearDedupConfig, *, out_dir: str | None, batch_size: int = 1024, parts: int = 0):
    """Mark near-duplicates in `ds` (rows with id/text/DROP, as in the pipeline).
    Returns (lazy dataset of the same rows, info dict for stats.json). Writes
    out_dir/duplicates/*.parquet (only parquet there, so the folder reads as one table)."""
    from zerolm.ray_env import cluster_cpus

    parts = parts or cfg.num_partitions or 2 * cluster_cpus()
    info: dict = {"method": cfg.method, "partitions": parts}
    idf = None
    if cfg.method == "simhash" and cfg.simhash.weights == "tfidf":
        ds = ds.materialize()  # read twice: document frequencies, then fingerprints
        idf = _idf(ds, cfg, batch_size)
    signed = ds.map_batches(Signer(cfg, idf), batch_size=batch_size, batch_format="pandas").materialize()
    edges = _candidate_edges(signed, cfg, parts, info)
    info["verified_edges"] = edges.count()
    final = connected_components(edges, parts=parts, max_local_edges=cfg.local_components_max_edges,
                                 max_rounds=cfg.max_rounds, info=info)
    info["removed"] = final.count()
    if out_dir and cfg.write_duplicates:
        dup_dir = Path(out_dir) / DUPLICATES_DIR
        dup_dir.mkdir(parents=True, exist_ok=True)
        if info["removed"]:
            final.map_batches(Audit(cfg), batch_format="pyarrow").write_parquet(str(dup_dir))
        else:  # readers get an empty table with the schema rather than no file
            pq.write_table(AUDIT_SCHEMA.empty_table(), dup_dir / "empty.parquet")
    if info["removed"] == 0:
        return signed.map_batches(_drop_helpers, batch_format="pyarrow"), info
    schema = signed.schema().base_schema  # unified over the materialized blocks
    marked = (signed.map_batches(Conform(schema), batch_size=None, batch_format="pyarrow")
              .union(final.map_batches(Markers(schema), batch_format="pyarrow"))
              .repartition(parts, keys=[NODE])
              .map_batches(Mark(), batch_size=None, batch_format="pyarrow"))
    return marked, info
