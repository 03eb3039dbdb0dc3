"""Symbol filter: drop markup, tables, link lists and symbol junk.

Rules (the Gopher ones from Rae et al. 2021, the ratios with defaults measured on
People's Daily, Chinese Wikipedia, Zhihu, English Wikipedia and C4):
  symbol_ratio         symbols / non-space chars > max_symbol_ratio. "Symbol" is the
                       SYMBOL class of charclass.py: not a letter, digit, space or prose
                       punctuation (CJK punctuation is prose), so $ # % & * @ | ~ < >
                       emoji and box drawing count, 。，、《》 and . , ( ) - / do not.
  digit_ratio          digits / non-space chars > max_digit_ratio (score tables, IDs).
  hash_ellipsis_ratio  Gopher: "#" per word or ellipses ("…", "...") per word >
                       max_hash_ellipsis_ratio. A CJK character counts as a word
                       (textstats.Chars.words), so Chinese "……" is judged per character
                       (a 7-character fragment ending in "……" still exceeds 0.1).
  bullet_lines         Gopher: fraction of non-empty lines starting with a bullet
                       (• ● ■ ◆ ► ➢ ※ ★ ..., or - * + followed by a space) >
                       max_bullet_lines_frac.
  ellipsis_lines       Gopher: fraction of non-empty lines ending in an ellipsis >
                       max_ellipsis_lines_frac (truncated teasers, "read more...").
  The two line rules only judge documents with at least `min_lines_for_line_rules`
  non-empty lines: a fraction of one line says nothing (one paragraph ending in "……"
  is normal Chinese; line-per-document corpora would otherwise lose every such line).
The first failing rule, in the order above, is the reason.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from dataproc.base import Filter
from dataproc.filters.textstats import SPACE, Chars, chunked, digit_ratio, safe_div, symbol_ratio
from zerolm.config import StrictModel

_BULLETS = np.array([ord(c) for c in "•●○◦▪▫■□◆◇►▶➢➤‣⁃※★☆✓✔·"], dtype=np.uint32)
_DASHES = np.array([ord(c) for c in "-*+"], dtype=np.uint32)
_HELLIP, _DOT, _HASH = 0x2026, ord("."), ord("#")


class SymbolsConfig(StrictModel):
    enabled: bool = True
    max_symbol_ratio: float = Field(default=0.1, ge=0, le=1)
    max_digit_ratio: float = Field(default=0.4, ge=0, le=1)
    max_hash_ellipsis_ratio: float = Field(default=0.1, ge=0)
    max_bullet_lines_frac: float = Field(default=0.9, ge=0, le=1)
    max_ellipsis_lines_frac: float = Field(default=0.3, ge=0, le=1)
    min_lines_for_line_rules: int = Field(default=2, ge=1)


def _ellipsis_starts(cp: np.ndarray) -> np.ndarray:
    """True at the first character of each "…"-run or "..."-run (3+ dots)."""
    hellip = cp == _HELLIP
    dot = cp == _DOT
    triple = np.zeros_like(dot)
    triple[:-2] = dot[:-2] & dot[1:-1] & dot[2:]
    starts = hellip | triple
    # Only the start of a run counts: "……" or "......" is one ellipsis.
    prev = np.zeros_like(dot)
    prev[1:] = hellip[:-1] | dot[:-1]
    return starts & ~prev


class SymbolsFilter(Filter):
    name = "symbols"

    def __init__(self, cfg: SymbolsConfig):
        super().__init__()
        self.cfg = cfg

    @chunked
    def keep(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        cfg, ch = self.cfg, Chars(texts)
        cp = ch.cp
        words = ch.words
        hash_r = safe_div(ch.per_doc(cp == _HASH), words)
        ell_r = safe_div(ch.per_doc(_ellipsis_starts(cp)), words)

        ln = ch.lines
        first, last, doc = ln["first"], ln["last"], ln["doc"]
        nxt = np.minimum(first + 1, len(cp) - 1)
        bullet = np.isin(cp[first], _BULLETS) | (np.isin(cp[first], _DASHES) & (ch.cls[nxt] == SPACE))
        ends_ell = (cp[last] == _HELLIP) | (
            (cp[last] == _DOT) & (cp[np.maximum(last - 1, 0)] == _DOT) & (cp[np.maximum(last - 2, 0)] == _DOT)
        )
        n_lines = ch.n_lines
        bullet_frac = safe_div(np.bincount(doc[bullet], minlength=ch.n), n_lines)
        ell_frac = safe_div(np.bincount(doc[ends_ell], minlength=ch.n), n_lines)
        multi = n_lines >= cfg.min_lines_for_line_rules

        checks = [
            ("symbol_ratio", symbol_ratio(ch) > cfg.max_symbol_ratio),
            ("digit_ratio", digit_ratio(ch) > cfg.max_digit_ratio),
            ("hash_ellipsis_ratio", np.maximum(hash_r, ell_r) > cfg.max_hash_ellipsis_ratio),
            ("bullet_lines", multi & (bullet_frac > cfg.max_bullet_lines_frac)),
            ("ellipsis_lines", multi & (ell_frac > cfg.max_ellipsis_lines_frac)),
        ]
        reasons = np.select([c for _, c in checks], [r for r, _ in checks], default="").astype(object)
        return reasons == "", reasons
