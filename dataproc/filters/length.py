"""Length filter: drop documents too short to teach anything or too long to be text.

Length is the number of non-whitespace characters (spaces are removed everywhere, not
only at the ends, so padding or space runs never count and Chinese, which has no
spaces, is measured like English). A CJK character carries about as much text as a
short English word, roughly three Latin letters, so by default it counts 3: a
9-character People's Daily headline (北京举行新年音乐会, "27") passes `min_chars=20`
like a 4-word English sentence does, while bylines and photo credits (李瑛, （传真照片）)
are dropped. Set `cjk_weight: 1.0` to count raw characters.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from dataproc.base import Filter
from dataproc.filters.textstats import Chars, chunked, length
from zerolm.config import StrictModel


class LengthConfig(StrictModel):
    enabled: bool = True
    min_chars: int = Field(default=20, ge=0)
    max_chars: int = Field(default=1_000_000, ge=1)
    # How many characters one CJK character counts for (see module docstring).
    cjk_weight: float = Field(default=3.0, gt=0)


class LengthFilter(Filter):
    name = "length"

    def __init__(self, cfg: LengthConfig):
        super().__init__()
        self.cfg = cfg

    @chunked
    def keep(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        n = length(Chars(texts), self.cfg.cjk_weight)
        short = n < self.cfg.min_chars
        long_ = n > self.cfg.max_chars
        reasons = np.where(short, "too_short", np.where(long_, "too_long", "")).astype(object)
        return ~(short | long_), reasons
