"""Wiring the model steps into `zerolm data run` (the only module here that touches
Ray Data besides curriculum.py).

    ... -> exact dedup -> near dedup -> [langid -> quality -> perplexity scoring]
                                                                   (one map_batches)
        -> [percentile pass: materialize; (group, bin, n) histograms of ppl summed
            over the cluster; per-group ceiling on the driver -> perplexity filter]
        -> outlier -> write

The steps run after both dedups so no duplicate is scored, in the order cheapest and
most selective first. Before anything runs, `check_models` loads every configured
model on the driver: a missing, corrupt or wrong model file is a UserError (exit 2)
in a second, not a failed Ray task after the read stage.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dataproc.base import live_mask
from dataproc.quality import quantiles
from dataproc.quality.steps import PPL, PerplexityStep, build_model_steps, ppl_groups


def model_step_names(cfg) -> list[str]:
    return [s.name for s in build_model_steps(cfg)]


def check_models(cfg) -> dict:
    """Load every enabled model once (UserError if one is unusable); return their
    file fingerprints for the run's config hash ({} when no model step is enabled,
    so the hash of a run without models is unchanged)."""
    from dataproc.quality import ftmodel
    from dataproc.quality.perplexity import load_ppl_model

    prints = {}
    if cfg.langid.enabled:
        ftmodel.check_langid_model(cfg.langid.model)
        unknown = sorted(set(cfg.langid.keep) - set(ftmodel.labels_of(ftmodel.load(cfg.langid.model, "langid.model"))))
        if unknown:
            from zerolm.errors import UserError

            raise UserError(f"langid.keep: the model {cfg.langid.model} knows no language(s) {unknown}")
        prints["langid"] = ftmodel.file_fingerprint(cfg.langid.model)
    if cfg.quality.enabled:
        ftmodel.check_quality_model(cfg.quality.model)
        prints["quality"] = ftmodel.file_fingerprint(cfg.quality.model)
    if cfg.perplexity.enabled:
        load_ppl_model(cfg.perplexity.model)
        prints["perplexity"] = ftmodel.file_fingerprint(cfg.perplexity.model)
    return {"models": prints} if prints else {}


def ppl_histogram(batch: pd.DataFrame, per_source: bool) -> pd.DataFrame:
    """First pass: (group, bin, n) of the live rows' perplexities."""
    from dataproc.quality.perplexity import route

    idx = np.flatnonzero(live_mask(batch))
    if PPL not in batch.columns or not len(idx):
        return quantiles.partial_histogram(np.zeros(0, object), np.zeros(0))
    texts = batch["text"].iloc[idx].tolist()
    groups = ppl_groups(batch, idx, route(texts), per_source)
    return quantiles.partial_histogram(groups, batch[PPL].to_numpy(np.float64)[idx])


def add_model_steps(ds, cfg, batch_size: int):
    """Append the enabled model steps to a Ray Dataset. Returns (dataset, info for
    stats.json: the percentile ceilings per group, if any)."""
    steps = build_model_steps(cfg)
    if not steps:
        return ds, {}
    from dataproc.pipeline import StepChain

    ds = ds.map_batches(StepChain(steps), batch_size=batch_size, batch_format="pandas")
    p = cfg.perplexity
    if not (p.enabled and p.max_percentile is not None):
        return ds, {}
    ds = ds.materialize()  # the histogram pass and the filter both read the scores: compute them once
    hist = ds.map_batches(ppl_histogram, fn_args=(p.per_source,), batch_size=None, batch_format="pandas")
    totals = hist.groupby(["group", "bin"]).sum("n").to_pandas().rename(columns={"sum(n)": "n"})
    ceilings = {g: q[0] for g, q in quantiles.quantiles(totals, [p.max_percentile / 100], p.min_docs).items()} \
        if len(totals) else {}
    ds = ds.map_batches(PerplexityStep(p, ceilings, score=False), batch_size=batch_size, batch_format="pandas")
    return ds, {"perplexity_ceilings": {g: round(v, 2) for g, v in sorted(ceilings.items())}}
