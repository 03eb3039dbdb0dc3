"""Outlier rule: drop documents whose statistic lies outside mean ± k·σ of its group.

Not in the filter registry, because it needs corpus statistics: the pipeline runs it
in two passes.
  1. `partial_moments(batch, stats, per_source)` on every batch -> a tiny frame of
     (group, stat, n, s1=Σx, s2=Σx²) over live rows; the pipeline sums these over
     the cluster (moments are additive, so the result is exact whatever the blocks).
  2. `thresholds_from_moments(moments, k, min_docs)` on the driver ->
     {(group, stat): (lo, hi)}; then `OutlierFilter(stats, thresholds, per_source)`
     runs like any filter. A group is a source (per_source) or "*" (whole corpus);
     groups with fewer than min_docs live documents are absent, hence not judged.
σ is the population standard deviation (numpy's default, ddof=0).

The statistics are the same functions the quality filters use (textstats), so
"symbol_ratio" here is the symbols filter's symbol ratio.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pandas as pd

from dataproc.base import SOURCE, TEXT, Filter, ensure_drop_column, live_mask
from dataproc.filters import textstats as ts

ALL_GROUPS = "*"

_FROM_CHARS: dict[str, Callable[[ts.Chars], np.ndarray]] = {
    "log_length": lambda ch: np.log1p(ts.length(ch)),  # log: lengths are ~log-normal
    "symbol_ratio": ts.symbol_ratio,
    "digit_ratio": ts.digit_ratio,
    "mean_line_length": ts.mean_line_length,
    "cjk_ratio": ts.cjk_ratio,
}


def compute_stats(texts: list[str], stats: list[str]) -> dict[str, np.ndarray]:
    """Several statistics over one shared character pass."""
    unknown = [s for s in stats if s not in _FROM_CHARS]
    if unknown:
        raise ValueError(f"unknown outlier statistics {unknown}; known: {sorted(_FROM_CHARS)}")
    parts = []
    for part in ts.chunk_slices(texts):  # bounded memory, see textstats.MAX_CHUNK_CHARS
        ch = ts.Chars(texts[part])
        parts.append({s: np.asarray(_FROM_CHARS[s](ch), dtype=np.float64) for s in stats})
    return {s: np.concatenate([p[s] for p in parts]) for s in stats}


STATISTICS: dict[str, Callable[[list[str]], np.ndarray]] = {
    name: (lambda texts, name=name: compute_stats(texts, [name])[name]) for name in _FROM_CHARS
}


def _groups(batch: pd.DataFrame, rows: np.ndarray, per_source: bool) -> np.ndarray:
    if per_source and SOURCE in batch.columns:
        return batch[SOURCE].iloc[rows].astype(str).to_numpy(dtype=object)
    return np.full(len(rows), ALL_GROUPS, dtype=object)


def partial_moments(batch: pd.DataFrame, stats: list[str], per_source: bool) -> pd.DataFrame:
    """Count, Σx and Σx² per (group, stat) over the live rows of one batch."""
    rows = np.flatnonzero(live_mask(batch))
    values = compute_stats(batch[TEXT].iloc[rows].tolist(), stats)
    groups = _groups(batch, rows, per_source)
    parts = []
    for stat in stats:
        x = pd.DataFrame({"group": groups, "x": values[stat]})
        x["x2"] = x["x"] ** 2
        agg = x.groupby("group", sort=True).agg(n=("x", "size"), s1=("x", "sum"), s2=("x2", "sum")).reset_index()
        agg.insert(1, "stat", stat)
        parts.append(agg)
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    return out.reindex(columns=["group", "stat", "n", "s1", "s2"]).astype(
        {"group": object, "stat": object, "n": np.int64, "s1": np.float64, "s2": np.float64}
    )


Thresholds = dict[tuple[str, str], tuple[float, float]]  # (group, stat) -> (lo, hi)


def thresholds_from_moments(moments: pd.DataFrame, k: float, min_docs: int) -> Thresholds:
    """{(group, stat): (mean - k·σ, mean + k·σ)} from summed moments."""
    total = moments.groupby(["group", "stat"], sort=True)[["n", "s1", "s2"]].sum()
    out = {}
    for (group, stat), (n, s1, s2) in zip(total.index, total.to_numpy(dtype=np.float64)):
        if n < min_docs:
            continue
        mean = s1 / n
        sd = math.sqrt(max(s2 / n - mean * mean, 0.0))  # clamp rounding below zero
        # A hair of slack so a group with σ = 0 does not drop its own members for the
        # last bit of rounding in s1 / n.
        eps = 1e-9 * max(1.0, abs(mean))
        out[str(group), str(stat)] = (float(mean - k * sd - eps), float(mean + k * sd + eps))
    return out


class OutlierFilter(Filter):
    """Reason `outlier_<stat>` for the first statistic (in `stats` order) outside its
    group's range; documents of groups without thresholds are kept."""

    name = "outlier"

    def __init__(self, stats: list[str], thresholds: Thresholds, per_source: bool):
        super().__init__()
        compute_stats([], stats)  # fail early on an unknown statistic
        self.stats, self.thresholds, self.per_source = list(stats), dict(thresholds), per_source
        self._groups: np.ndarray | None = None

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        # keep() only sees texts; hand it the live rows' groups in the same order the
        # base class collects the texts (live rows, in row order).
        batch = ensure_drop_column(batch)
        self._groups = _groups(batch, np.flatnonzero(live_mask(batch)), self.per_source)
        try:
            return super().__call__(batch)
        finally:
            self._groups = None

    def keep(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        groups = self._groups if self._groups is not None else np.full(len(texts), ALL_GROUPS, dtype=object)
        groups = pd.Series(groups)
        values = compute_stats(texts, self.stats)
        reasons = np.full(len(texts), "", dtype=object)
        for stat in reversed(self.stats):  # so the first failing statistic wins
            bounds = {g: b for (g, s), b in self.thresholds.items() if s == stat}
            lo = groups.map({g: b[0] for g, b in bounds.items()}).to_numpy(dtype=np.float64, na_value=np.nan)
            hi = groups.map({g: b[1] for g, b in bounds.items()}).to_numpy(dtype=np.float64, na_value=np.nan)
            # NaN bounds (group not judged) compare False: kept.
            reasons[(values[stat] < lo) | (values[stat] > hi)] = f"outlier_{stat}"
        return reasons == "", reasons
