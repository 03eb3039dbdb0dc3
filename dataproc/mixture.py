"""Data mixture: per-source sampling weights in one or more stages.

A stage is a share of the training samples with its own weights, e.g. a general stage
at the natural mix, then an annealing stage that up-samples high-quality sources (the
MiniCPM recipe). `pack` validates and records the stages in manifest.json; the
trainer's reader (train/data.py) samples by them.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from dataproc.quality.buckets import base_source, bucketed_weights
from zerolm.config import StrictModel
from zerolm.errors import UserError

ANY = "*"  # weight for every source a stage does not name


class MixtureStage(StrictModel):
    name: str
    # Share of all training samples spent in this stage (shares are normalized).
    fraction: float = Field(default=1.0, gt=0)
    # Source -> weight; "*" covers unnamed sources; empty = proportional to tokens.
    # Weights need not sum to 1 (they are normalized); unnamed sources without "*" get 0.
    weights: dict[str, float] = Field(default_factory=dict)
    # Curriculum (pack's curriculum.buckets): how each source's weight is shared by its
    # score buckets, bucket 0 first, e.g. [1, 0, 0] = only the easiest third ("easy
    # first") or the best third (buckets by quality_score, annealing). Empty = by tokens.
    buckets: list[float] = Field(default_factory=list)

    @field_validator("buckets")
    @classmethod
    def _bucket_weights(cls, value: list) -> list:
        if value and (min(value) < 0 or sum(value) <= 0):
            raise ValueError("bucket weights must be >= 0 with at least one > 0")
        return value

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, value: dict) -> dict:
        bad = {k: v for k, v in value.items() if v < 0}
        if bad:
            raise ValueError(f"weights must be >= 0, got {bad}")
        if value and sum(value.values()) <= 0:
            raise ValueError("at least one weight must be > 0")
        return value


def validate_mixture(stages: list[MixtureStage], sources: set[str]) -> None:
    names = set()
    for stage in stages:
        if stage.name in names:
            raise UserError(f"mixture: stage name {stage.name!r} used twice")
        names.add(stage.name)
        unknown = sorted(set(stage.weights) - sources - {ANY})
        if unknown:
            raise UserError(f"mixture stage {stage.name!r}: unknown source(s) {unknown}; "
                            f"the corpus has {sorted(sources)}")


def resolve_weights(stage: dict, tokens_by_source: dict[str, int]) -> dict[str, float]:
    """Normalized weights of one stage over the sources that have training tokens."""
    weights = stage.get("weights") or {}
    # Curriculum buckets ("<source>@b<k>") share their source's weight (see
    # dataproc/quality/buckets.py); for unbucketed sources this is weight or tokens.
    raw = bucketed_weights(weights, stage.get("buckets") or [], tokens_by_source, ANY, stage.get("name"))
    unknown = sorted(set(weights) - {base_source(s) for s in tokens_by_source} - {ANY})
    if unknown:
        raise UserError(f"mixture stage {stage.get('name')!r}: source(s) {unknown} have no training tokens")
    total = sum(raw.values())
    if total <= 0:
        raise UserError(f"mixture stage {stage.get('name')!r} gives every source weight 0")
    return {s: w / total for s, w in raw.items() if w > 0}
