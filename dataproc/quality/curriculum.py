"""Curriculum in `zerolm pack`: order and/or bucket documents by a score column.

Scores come from the clean corpus (quality_score, ppl, rarity, language_score, any
numeric column) or "length" (characters of the text, computed here when the corpus
has no such column). The seed's curriculum papers order by length, rarity (mean
-log p of the tokens) and perplexity; bucket 0 holds the lowest scores
(`ascending: true`: shortest, commonest, most predictable = easiest) or the highest
(`ascending: false`: for quality_score, best first).

  * buckets > 1: the training documents of each source are split at the source's
    score quantiles (a histogram pass on the driver over the score column only) into
    sources "<source>@b<k>" (buckets.py), which mixture stages weight.
  * order: the documents of every (split, source) are written in score order (a Ray
    Data sort), so shards read front to back go easy to hard.
Documents without a score (null) go to the last bucket / the end.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from dataproc.quality import quantiles
from dataproc.quality.buckets import bucket_name
from zerolm.config import StrictModel
from zerolm.errors import UserError

KEY = "_curriculum_key"  # the score as sorted: ascending, nulls last
LENGTH = "length"


class CurriculumConfig(StrictModel):
    # Column of the clean corpus to order/bucket by, or "length"; None = no curriculum.
    score: Optional[str] = None
    # Score buckets per source for mixture stages (see buckets.py); 1 = none.
    buckets: int = Field(default=1, ge=1, le=64)
    # Write each (split, source) in score order.
    order: bool = False
    # True: bucket 0 / first = lowest score (easy first by ppl, rarity, length);
    # False: highest first (best first by quality_score).
    ascending: bool = True


def enabled(cfg: CurriculumConfig) -> bool:
    return cfg.score is not None and (cfg.buckets > 1 or cfg.order)


def key_values(table: pa.Table, cfg: CurriculumConfig) -> np.ndarray:
    """The sort key of each row: the score (negated when descending), NaN -> +inf."""
    if cfg.score == LENGTH and LENGTH not in table.column_names:
        values = np.array([len(t) for t in table.column("text").to_pylist()], dtype=np.float64)
    else:
        values = table.column(cfg.score).to_numpy(zero_copy_only=False).astype(np.float64)
    values = values if cfg.ascending else -values
    return np.where(np.isnan(values), np.inf, values)


def extra_columns(cfg: CurriculumConfig) -> list[str]:
    """Columns pack must read besides id, text, source."""
    if not enabled(cfg) or cfg.score in ("id", "text", "source", LENGTH):
        return []
    return [cfg.score]


def plan_curriculum(cfg: CurriculumConfig, files: list[str], mixture) -> Optional[dict]:
    """Validate; compute the per-source bucket edges. None when there is no curriculum."""
    for stage in mixture:
        if stage.buckets and len(stage.buckets) != cfg.buckets:
            raise UserError(f"mixture stage {stage.name!r} gives {len(stage.buckets)} bucket weights but "
                            f"curriculum.buckets is {cfg.buckets}")
    if not enabled(cfg):
        if cfg.score is None and (cfg.buckets > 1 or cfg.order):
            raise UserError("curriculum.buckets / curriculum.order need curriculum.score (a column or 'length')")
        return None
    if cfg.score != LENGTH:
        for f in files:
            schema = pq.read_schema(f)
            if cfg.score not in schema.names:
                raise UserError(f"curriculum.score: the clean corpus has no column {cfg.score!r} ({f} has "
                                f"{[n for n in schema.names if n not in ('id', 'text', 'source')]}); "
                                "enable the step that writes it in `zerolm data run`, or use 'length'")
            if not pa.types.is_integer(schema.field(cfg.score).type) and \
                    not pa.types.is_floating(schema.field(cfg.score).type):
                raise UserError(f"curriculum.score: column {cfg.score!r} is not numeric")
    edges: dict[str, list[float]] = {}
    if cfg.buckets > 1:
        columns = ["source", "text"] if cfg.score == LENGTH else ["source", cfg.score]
        parts = []
        for f in files:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=65536, columns=columns):
                table = pa.Table.from_batches([batch])
                parts.append(quantiles.partial_histogram(table.column("source").to_numpy(zero_copy_only=False),
                                                         key_values(table, cfg)))
        import pandas as pd

        hist = pd.concat(parts, ignore_index=True)
        edges = quantiles.quantiles(hist, [k / cfg.buckets for k in range(1, cfg.buckets)]) if len(hist) else {}
    return {**cfg.model_dump(), "edges": edges}


def assign_buckets(batch: pa.Table, plan: dict, val_fraction: float, forced_val: frozenset) -> pa.Table:
    """map_batches function: the sort key, and training documents renamed to their
    bucket source (validation documents keep their source: per-source val sets)."""
    from dataproc.pack import split_of

    cfg = CurriculumConfig.model_validate({k: v for k, v in plan.items() if k != "edges"})
    keys = key_values(batch, cfg)
    sources = batch.column("source").to_pylist()
    if cfg.buckets > 1:
        ids = batch.column("id").to_pylist()
        for i, (doc_id, source) in enumerate(zip(ids, sources)):
            if split_of(doc_id, val_fraction, forced_val) == "train":
                edges = plan["edges"].get(source)
                # a source with no finite scores has no edges: everything in bucket 0
                k = int(np.searchsorted(edges, keys[i], side="left")) if edges else 0
                sources[i] = bucket_name(source, min(k, cfg.buckets - 1))
    out = batch.set_column(batch.column_names.index("source"), "source", pa.array(sources, type=pa.string()))
    return out.append_column(KEY, pa.array(keys, type=pa.float64()))


def apply_curriculum(ds, plan: Optional[dict], val_fraction: float, forced_val: frozenset):
    """Bucket (and sort, when `order`) a Ray Dataset of clean documents."""
    if plan is None:
        return ds
    ds = ds.map_batches(assign_buckets, fn_args=(plan, val_fraction, forced_val), batch_format="pyarrow")
    if plan["order"]:
        ds = ds.sort(["source", KEY])
    return ds
