"""Repetition filter: Gopher's repetition rules (Rae et al. 2021, table A1).

A document is dropped when
  dup_line_frac       duplicate lines / lines                        > 0.30
  dup_para_frac       duplicate paragraphs / paragraphs              > 0.30
  dup_line_char_frac  chars in duplicate lines / chars in lines      > 0.20
  dup_para_char_frac  chars in duplicate paragraphs / chars in paras > 0.20
  top_ngram_frac      chars of the most frequent n-gram (n=2,3,4) times its count /
                      chars in words                  > 0.20, 0.18, 0.16
  dup_ngram_frac      chars covered by repeated n-grams (n=5..10) / chars in words
                      > 0.15, 0.14, 0.13, 0.12, 0.11, 0.10
"Duplicate" means every occurrence after the first. Lines are split on "\\n",
paragraphs on blank lines, both stripped, empty ones ignored.

Words: Chinese has no spaces, so a word is a run of letters/digits outside CJK, and
every CJK character is a word on its own (`zh_tokenizer: char`, the default: fast and
dictionary-free). `zh_tokenizer: jieba` segments CJK runs with jieba instead (closer
to real Chinese words, ~10x slower). Character counts exclude spaces and punctuation.

In char mode a character is less than a word, and Chinese prose repeats full names
where English uses pronouns: Gopher's n applied to characters drops ~9% of Chinese
Wikipedia paragraphs (cmrc2018; 5-character names said a few times). So for a
mostly-CJK document (cjk_ratio >= 0.5) the rule for n words uses n-grams of
round(n * `cjk_ngram_scale`) characters (default 2.5: bigrams -> 5 characters,
10-grams -> 25; measured: drops 0.6% of cmrc2018, 0.2% of People's Daily paragraphs,
and still catches boilerplate), and such a document has chars / cjk_ngram_scale words
for `min_words`. The n-gram rules, like Gopher, only judge documents of at least
`min_words` words: a phrase said twice in a 30-word paragraph is not boilerplate.
Line and paragraph rules judge every document.

Differences from the reference implementation (datatrove), for vectorisation: the most
frequent n-gram only counts when it occurs at least twice (a short headline is not
"repetitive" because its only bigram fills 40% of it); repeated n-gram coverage is the
union of all repeated occurrences instead of a greedy left-to-right skip. The
computation is batch-wide and vectorised (ngrams.py).
"""

from __future__ import annotations

import re
from itertools import chain
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from dataproc.base import Filter
from dataproc.filters.ngrams import dup_fracs, ngram_fracs
from dataproc.filters.textstats import CJK_CHARCLASS, Chars, chunked, cjk_ratio
from zerolm.config import StrictModel

_RUN = re.compile(rf"[{CJK_CHARCLASS}]+|[^\W_{CJK_CHARCLASS}]+")
_CJK_RUN = re.compile(rf"[{CJK_CHARCLASS}]")
_PARA = re.compile(r"\n[^\S\n]*\n")


class RepetitionConfig(StrictModel):
    enabled: bool = True
    zh_tokenizer: Literal["char", "jieba"] = "char"
    # char mode: a mostly-CJK document's n-word rule uses n-grams of n * this many
    # characters (see module docstring); 1.0 applies Gopher's n to characters as is.
    cjk_ngram_scale: float = Field(default=2.5, ge=1)
    # The n-gram rules only judge documents of at least this many words (Gopher drops
    # shorter ones outright; here the length filter decides about them).
    min_words: int = Field(default=50, ge=0)
    max_dup_line_frac: float = Field(default=0.30, ge=0, le=1)
    max_dup_para_frac: float = Field(default=0.30, ge=0, le=1)
    max_dup_line_char_frac: float = Field(default=0.20, ge=0, le=1)
    max_dup_para_char_frac: float = Field(default=0.20, ge=0, le=1)
    # n -> threshold; an empty mapping disables the rule.
    max_top_ngram_char_frac: dict[int, float] = Field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    max_dup_ngram_char_frac: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )

    @field_validator("max_top_ngram_char_frac", "max_dup_ngram_char_frac")
    @classmethod
    def _n_at_least_2(cls, value: dict[int, float]) -> dict[int, float]:
        if any(n < 2 for n in value):
            raise ValueError("n-gram sizes must be >= 2")
        return value


class RepetitionFilter(Filter):
    name = "repetition"

    def __init__(self, cfg: RepetitionConfig):
        super().__init__()
        self.cfg = cfg

    def tokens(self, texts: list[str], ch: Chars) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document, 64-bit id, char length) of every word of the batch."""
        if self.cfg.zh_tokenizer == "char":
            start, end = ch.tokens
            return ch.doc[start], ch.token_hashes(), (end - start).astype(np.float64)
        import jieba  # lazily: loading its dictionary takes a second

        toks = []
        for text in texts:
            toks.append([w for run in _RUN.findall(text) for w in (jieba.lcut(run) if _CJK_RUN.match(run) else (run,))])
        flat = np.array(list(chain.from_iterable(toks)), dtype=object)
        doc = np.repeat(np.arange(len(texts)), np.fromiter(map(len, toks), dtype=np.int64, count=len(texts)))
        lens = np.fromiter(map(len, flat), dtype=np.float64, count=len(flat))
        return doc, pd.util.hash_array(flat) if len(flat) else np.zeros(0, np.uint64), lens

    def ngram_rules(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Per document: (top n-gram rule violated, repeated n-gram rule violated)."""
        n, cfg, ch = len(texts), self.cfg, Chars(texts)
        doc, ids, lens = self.tokens(texts, ch)
        n_tok = np.bincount(doc, minlength=n)
        scale = cfg.cjk_ngram_scale if cfg.zh_tokenizer == "char" else 1.0
        zh = cjk_ratio(ch) >= 0.5 if scale != 1.0 else np.zeros(n, dtype=bool)
        judged = np.where(zh, n_tok / scale, n_tok) >= cfg.min_words
        rules = [("top", m, t) for m, t in cfg.max_top_ngram_char_frac.items()]
        rules += [("dup", m, t) for m, t in cfg.max_dup_ngram_char_frac.items()]
        size = {(m, z): int(m * scale + 0.5) if z else m for _, m, _ in rules for z in (False, True)}
        frac = {(kind, size[m, z]): np.zeros(n) for kind, m, _ in rules for z in (False, True)}
        keep_tok = judged[doc]  # short documents are not judged: drop their tokens
        if rules and keep_tok.any():
            ngram_fracs(doc[keep_tok], ids[keep_tok], lens[keep_tok], frac)
        bad = {"top": np.zeros(n, dtype=bool), "dup": np.zeros(n, dtype=bool)}
        for kind, m, thr in rules:
            bad[kind] |= np.where(zh, frac[kind, size[m, True]], frac[kind, size[m, False]]) > thr
        return bad["top"], bad["dup"]

    @chunked
    def keep(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.cfg
        lines = [[s for s in map(str.strip, t.split("\n")) if s] for t in texts]
        paras = [[s for s in map(str.strip, _PARA.split(t)) if s] if "\n" in t else l for t, l in zip(texts, lines)]
        line_frac, line_char = dup_fracs(lines)
        para_frac, para_char = dup_fracs(paras)
        top_bad, dup_bad = self.ngram_rules(texts)
        checks = [
            ("dup_line_frac", line_frac > cfg.max_dup_line_frac),
            ("dup_para_frac", para_frac > cfg.max_dup_para_frac),
            ("dup_line_char_frac", line_char > cfg.max_dup_line_char_frac),
            ("dup_para_char_frac", para_char > cfg.max_dup_para_char_frac),
            ("top_ngram_frac", top_bad),
            ("dup_ngram_frac", dup_bad),
        ]
        reasons = np.select([c for _, c in checks], [r for r, _ in checks], default="").astype(object)
        return reasons == "", reasons
