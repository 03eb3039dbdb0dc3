"""`zerolm data near-dedup`: near-duplicate removal alone, on any readable input.

It is `zerolm data run` with every other step switched off (no normalization, no
filters, no exact dedup, no outlier pass), so it shares the readers, the rejects/
handling, the accounting in stats.json, the _SUCCESS / re-run rules and the output
layout: DIR/data/*.parquet (kept documents), DIR/duplicates/*.parquet (removed_id,
kept_id, cluster_id, estimated_jaccard), DIR/stats.json (dropped near_duplicate=N,
plus a `near_dedup` section: band layout, edges, components path and rounds).
"""

from __future__ import annotations

from pydantic import Field

from dataproc.config import DataRunConfig, RayConfig, ReadConfig
from dataproc.filters import FiltersConfig
from dataproc.near_dedup.config import NearDedupConfig
from zerolm.config import StrictModel


class NearDedupRunConfig(StrictModel):
    output: str = ""
    read: ReadConfig = Field(default_factory=ReadConfig)
    near_dedup: NearDedupConfig = Field(default_factory=NearDedupConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    rows_per_file: int = Field(default=200_000, ge=1)

    def to_data_run(self) -> DataRunConfig:
        off = {"enabled": False}
        return DataRunConfig.model_validate({
            "output": self.output, "read": self.read.model_dump(), "near_dedup": self.near_dedup.model_dump(),
            "ray": self.ray.model_dump(), "rows_per_file": self.rows_per_file,
            "normalize": off, "exact_dedup": off, "outlier": off,
            "filters": {name: off for name in FiltersConfig.model_fields}})


def run_near_dedup(cfg: NearDedupRunConfig, *, overwrite: bool = False, echo=print) -> dict:
    from dataproc.pipeline import run_data

    if cfg.near_dedup.method == "off":
        from zerolm.errors import UserError

        raise UserError("near_dedup.method is off: nothing to do (use minhash or simhash)")
    return run_data(cfg.to_data_run(), overwrite=overwrite, echo=echo)
