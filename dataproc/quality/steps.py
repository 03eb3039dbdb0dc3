"""The model-based steps of `zerolm data run`: `langid`, `quality`, `perplexity`.

Each writes its score columns for every live document (dropped rows get null) and,
where configured, drops documents with reason "<step>:<reason>" like any filter:
  langid      language, language_score   other_language, undetermined
  quality     quality_score = P(high)    low_quality
  perplexity  ppl, rarity                perplexity (a fixed ceiling per LM
              language here; the per-source percentile needs a first pass, so
              stage.py computes it and hands this step the thresholds)
Steps hold only the model path; the model is loaded on first use in each worker
process and cached there (ftmodel.load, perplexity.load_ppl_model), so a step
pickles small and every Ray task after the first in a process reuses the model.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from dataproc.base import SOURCE, TEXT, Filter, ensure_drop_column, live_mask
from dataproc.filters.charclass import CJK, LATIN, LETTER
from dataproc.filters.textstats import Chars
from zerolm.config import StrictModel

LANGUAGE, LANGUAGE_SCORE, QUALITY_SCORE, PPL, RARITY = "language", "language_score", "quality_score", "ppl", "rarity"
UND = "und"


class LangidConfig(StrictModel):
    enabled: bool = False
    model: str = ""  # from `zerolm data train-langid`
    # Languages to keep (model labels, e.g. [zh, en]); empty = label only, drop nothing.
    keep: list[str] = Field(default_factory=list)
    # Below either, the label is `und` rather than a guess: short texts are where a
    # character n-gram model is unreliable (held-out accuracy at 20 characters ~0.75
    # vs ~0.96 on whole sentences).
    min_confidence: float = Field(default=0.5, ge=0, le=1)
    min_letters: int = Field(default=10, ge=0)
    # Whether `und` documents pass the `keep` filter (they are short or mixed, not
    # known to be another language).
    keep_und: bool = True
    max_chars: int = Field(default=500, ge=16)


class QualityConfig(StrictModel):
    enabled: bool = False
    model: str = ""  # from `zerolm data train-quality`
    # Drop documents with quality_score below this; None = score only.
    threshold: Optional[float] = Field(default=0.5, ge=0, le=1)
    max_chars: int = Field(default=2000, ge=16)  # as in training (QualityTrainConfig.max_chars)


class PerplexityConfig(StrictModel):
    enabled: bool = False
    model: str = ""  # from `zerolm data train-ppl`
    # Drop documents whose ppl is above this percentile of their group (a source and
    # LM language, or only the LM language when per_source is false), e.g. 95 drops
    # the worst ~5% of every source. Computed in a first pass over the corpus.
    max_percentile: Optional[float] = Field(default=None, gt=0, lt=100)
    # And/or a fixed ceiling per LM language, e.g. {zh: 2000, en: 5000} (character and
    # word perplexities are not on one scale, so there is no single number).
    max_ppl: dict[str, float] = Field(default_factory=dict)
    per_source: bool = True
    # Groups with fewer scored documents are not judged by the percentile rule.
    min_docs: int = Field(default=50, ge=1)

    @model_validator(mode="after")
    def _langs(self):
        unknown = sorted(set(self.max_ppl) - {"zh", "en"})
        if unknown:
            raise ValueError(f"max_ppl keys are LM languages zh/en, got {unknown}")
        return self


def _live_texts(batch: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    batch = ensure_drop_column(batch)
    idx = np.flatnonzero(live_mask(batch))
    return batch, idx, batch[TEXT].iloc[idx].tolist()


def _set_column(batch: pd.DataFrame, name: str, idx: np.ndarray, values, dtype) -> None:
    """Column `name` with `values` at rows idx and null elsewhere (every batch gets
    the column, so all blocks share one schema)."""
    if dtype is object:
        col = np.full(len(batch), None, dtype=object)
    else:
        col = np.full(len(batch), np.nan, dtype=np.float64)
    col[idx] = values
    batch[name] = pd.Series(col, index=batch.index, dtype=dtype)


class _ScoringFilter(Filter):
    """A filter whose decision comes from scores computed (and stored) in __call__."""

    def __init__(self) -> None:
        super().__init__()
        self._decision: Optional[tuple[np.ndarray, np.ndarray]] = None

    def keep(self, texts):
        mask, reasons = self._decision
        return mask, reasons

    def decide(self, batch: pd.DataFrame, idx: np.ndarray, mask: np.ndarray, reasons: np.ndarray) -> pd.DataFrame:
        self._decision = (mask, reasons)
        try:
            return super().__call__(batch)  # the base class marks, empties and counts
        finally:
            self._decision = None


class LangidStep(_ScoringFilter):
    name = "langid"

    def __init__(self, cfg: LangidConfig):
        super().__init__()
        self.cfg = cfg

    def label(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        from dataproc.quality import ftmodel
        from dataproc.quality.textprep import for_langid

        model = ftmodel.check_langid_model(self.cfg.model)
        labels, probs = ftmodel.predict(model, for_langid(texts, self.cfg.max_chars))
        lang = np.array([row[0] if row else UND for row in labels], dtype=object)
        conf = np.array([min(float(p[0]), 1.0) if len(p) else 0.0 for p in probs])
        counts = Chars(texts).counts if texts else np.zeros((0, 7))
        letters = counts[:, CJK] + counts[:, LATIN] + counts[:, LETTER]
        lang[(conf < self.cfg.min_confidence) | (letters < self.cfg.min_letters)] = UND
        return lang, conf

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch, idx, texts = _live_texts(batch)
        lang, conf = self.label(texts) if texts else (np.zeros(0, object), np.zeros(0))
        _set_column(batch, LANGUAGE, idx, lang, object)
        _set_column(batch, LANGUAGE_SCORE, idx, conf, np.float64)
        if not self.cfg.keep or not len(idx):
            return batch
        ok = np.isin(lang, self.cfg.keep) | ((lang == UND) & self.cfg.keep_und)
        reasons = np.where(lang == UND, "undetermined", "other_language").astype(object)
        return self.decide(batch, idx, ok, reasons)


class QualityStep(_ScoringFilter):
    name = "quality"

    def __init__(self, cfg: QualityConfig):
        super().__init__()
        self.cfg = cfg

    def score(self, texts: list[str]) -> np.ndarray:
        from dataproc.quality import ftmodel
        from dataproc.quality.textprep import for_quality

        model = ftmodel.check_quality_model(self.cfg.model)
        return ftmodel.prob_of(model, [for_quality(t, self.cfg.max_chars) for t in texts], ftmodel.QUALITY_LABELS[0])

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch, idx, texts = _live_texts(batch)
        score = self.score(texts) if texts else np.zeros(0)
        _set_column(batch, QUALITY_SCORE, idx, score, np.float64)
        if self.cfg.threshold is None or not len(idx):
            return batch
        return self.decide(batch, idx, score >= self.cfg.threshold, np.full(len(idx), "low_quality", dtype=object))


GROUP_ALL = "*"


def ppl_groups(batch: pd.DataFrame, idx: np.ndarray, lm_lang: np.ndarray, per_source: bool) -> np.ndarray:
    """Group of each scored row for the percentile rule: "<source>/<lm language>"."""
    if per_source and SOURCE in batch.columns:
        src = batch[SOURCE].iloc[idx].astype(str).to_numpy(dtype=object)
    else:
        src = np.full(len(idx), GROUP_ALL, dtype=object)
    return np.array([f"{s}/{lang}" for s, lang in zip(src, lm_lang)], dtype=object)


class PerplexityStep(_ScoringFilter):
    """Scores (ppl, rarity) and drops documents above their group's ceiling: the
    fixed max_ppl of the LM language and/or `thresholds` {group: ppl} computed by the
    percentile pass (stage.py). With `score=False` it only applies the thresholds to
    the columns an earlier PerplexityStep wrote (the second pass)."""

    name = "perplexity"

    def __init__(self, cfg: PerplexityConfig, thresholds: Optional[dict[str, float]] = None, *, score: bool = True):
        super().__init__()
        self.cfg, self.thresholds, self.do_score = cfg, dict(thresholds or {}), score

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from dataproc.quality.perplexity import load_ppl_model, route

        batch, idx, texts = _live_texts(batch)
        if self.do_score:
            ppl, rarity, lm_lang = load_ppl_model(self.cfg.model).score(texts) if texts else (
                np.zeros(0), np.zeros(0), np.zeros(0, object))
            _set_column(batch, PPL, idx, ppl, np.float64)
            _set_column(batch, RARITY, idx, rarity, np.float64)
        else:
            ppl, lm_lang = batch[PPL].to_numpy(dtype=np.float64)[idx], route(texts)
        if not len(idx) or not (self.cfg.max_ppl or self.thresholds):
            return batch
        ceiling = np.array([self.cfg.max_ppl.get(lang, np.inf) for lang in lm_lang], dtype=np.float64)
        if self.thresholds:
            groups = ppl_groups(batch, idx, lm_lang, self.cfg.per_source)
            ceiling = np.minimum(ceiling, pd.Series(groups).map(self.thresholds).to_numpy(np.float64, na_value=np.inf))
        ok = ~(ppl > ceiling)  # NaN (no model for the script) is kept
        return self.decide(batch, idx, ok, np.full(len(idx), "perplexity", dtype=object))


def build_model_steps(cfg) -> list[Filter]:
    """The enabled steps of a DataRunConfig, in pipeline order (the percentile pass
    of the perplexity step is added by stage.add_model_steps)."""
    steps: list[Filter] = []
    if cfg.langid.enabled:
        steps.append(LangidStep(cfg.langid))
    if cfg.quality.enabled:
        steps.append(QualityStep(cfg.quality))
    if cfg.perplexity.enabled:
        steps.append(PerplexityStep(cfg.perplexity))
    return steps
