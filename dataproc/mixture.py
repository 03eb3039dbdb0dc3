"""Data mixture: per-source sampling weights in one or more stages.

A stage is a share of the training samples with its own weights, e.g. a general stage
at the natural mix, then an annealing stage that up-samples high-quality sources (the
MiniCPM recipe). `pack` validates and records the stages in manifest.json; the
trainer's reader (train/data.py) samples by them.
"""

from __future__ import annotations

from pydantic import Field, field_validator

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
    if not weights:
        raw = {s: float(n) for s, n in tokens_by_source.items()}
    else:
        raw = {s: float(weights.get(s, weights.get(ANY, 0.0))) for s in tokens_by_source}
    unknown = sorted(set(weights) - set(tokens_by_source) - {ANY})
    if unknown:
        raise UserError(f"mixture stage {stage.get('name')!r}: source(s) {unknown} have no training tokens")
    total = sum(raw.values())
    if total <= 0:
        raise UserError(f"mixture stage {stage.get('name')!r} gives every source weight 0")
    return {s: w / total for s, w in raw.items() if w > 0}
