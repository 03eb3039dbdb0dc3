"""Script filter: keep documents that are mostly Chinese or Latin-script text.

`letter_ratio` = (CJK + Latin letters) / non-space characters. Prose in either
language is 0.65-0.98 (Chinese ~0.85 with its punctuation; Wikipedia and C4 ~0.95);
tables of numbers, markup, symbol art and other scripts (Cyrillic, Arabic, ...) fall
below `min_letter_ratio` (0.4 drops 0.6% of People's Daily paragraphs: all of them
stock-index and statistics table rows; digits are not letters here). `cjk_ratio` = CJK / (CJK + Latin letters) selects a language
when wanted: `min_cjk_ratio: 0.5` keeps mostly-Chinese documents only,
`max_cjk_ratio: 0.1` mostly-English ones. Both are off (None) by default because
the corpus is mixed.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from pydantic import Field

from dataproc.base import Filter
from dataproc.filters.textstats import Chars, chunked, cjk_ratio, letter_ratio
from zerolm.config import StrictModel


class ScriptConfig(StrictModel):
    enabled: bool = True
    min_letter_ratio: float = Field(default=0.4, ge=0, le=1)
    min_cjk_ratio: Optional[float] = Field(default=None, ge=0, le=1)
    max_cjk_ratio: Optional[float] = Field(default=None, ge=0, le=1)


class ScriptFilter(Filter):
    name = "script"

    def __init__(self, cfg: ScriptConfig):
        super().__init__()
        self.cfg = cfg

    @chunked
    def keep(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ch = Chars(texts)
        low = letter_ratio(ch) < self.cfg.min_letter_ratio
        bad_lang = np.zeros(len(texts), dtype=bool)
        if self.cfg.min_cjk_ratio is not None or self.cfg.max_cjk_ratio is not None:
            r = cjk_ratio(ch)
            if self.cfg.min_cjk_ratio is not None:
                bad_lang |= r < self.cfg.min_cjk_ratio
            if self.cfg.max_cjk_ratio is not None:
                bad_lang |= r > self.cfg.max_cjk_ratio
        reasons = np.where(low, "low_letter_ratio", np.where(bad_lang, "cjk_ratio", "")).astype(object)
        return ~(low | bad_lang), reasons
