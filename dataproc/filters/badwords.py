"""Bad-words filter: drop documents dense in spam, gambling or porn terms.

The score is hits per word. Terms without CJK characters match whole words,
case-insensitively: a term is a sequence of words in the sense of textstats (runs of
letters/digits; punctuation and spacing between them do not matter), so "casino"
never matches inside "casinoX" and "free spins" matches "Free  spins". Terms with CJK
characters match as substrings (Chinese has no word boundaries). Words are Latin words
plus CJK characters divided by `zh_chars_per_word` (~1.5 characters make a Chinese
word), so a ratio means the same in both languages. A document is dropped when it has
at least `min_hits` hits and hits/words > `max_ratio`: a mention or two (news about a
gambling crackdown, an article on "Casino Royale") never drops a document, keyword
stuffing does.

Matching is vectorised over the whole batch: word terms by hashing every word (and
every run of 2, 3 ... words) of the batch and looking the hashes up in the terms'
hash set (np.isin); CJK terms with one regex shaped like a trie (shared prefixes
factored out) run once over the batch joined into one string, hits mapped back to
documents with searchsorted. No loop over terms or documents.

The default list is the package data file `badwords_default.txt` (next to this file).
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Optional

import numpy as np
from pydantic import Field

from dataproc.base import Filter
from dataproc.filters.textstats import CJK, CJK_CHARCLASS, Chars, chunked, safe_div
from zerolm.config import StrictModel
from zerolm.errors import UserError

DEFAULT_FILE = "badwords_default.txt"
_HAS_CJK = re.compile(rf"[{CJK_CHARCLASS}]")
_MUL = np.uint64(0x9E3779B97F4A7C15)  # combines word hashes into a phrase hash


class BadwordsConfig(StrictModel):
    enabled: bool = True
    use_default_list: bool = True
    # Extra terms, and a UTF-8 file of terms (one per line, '#' comments), added to
    # the list. The file is read where the filter is built (each worker).
    words: list[str] = Field(default_factory=list)
    words_file: Optional[str] = None
    max_ratio: float = Field(default=0.03, ge=0)
    min_hits: int = Field(default=2, ge=1)
    zh_chars_per_word: float = Field(default=1.5, gt=0)


def parse_word_list(text: str) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [w for w in lines if w]


def load_words(cfg: BadwordsConfig) -> list[str]:
    words = list(cfg.words)
    if cfg.use_default_list:
        words += parse_word_list(resources.files(__package__).joinpath(DEFAULT_FILE).read_text(encoding="utf-8"))
    if cfg.words_file:
        path = Path(cfg.words_file).expanduser()
        if not path.is_file():
            raise UserError(f"filters.badwords.words_file not found: {path}")
        words += parse_word_list(path.read_text(encoding="utf-8"))
    return sorted({w.strip() for w in words if w.strip()})


def trie_regex(words: list[str]) -> str:
    """One alternation with shared prefixes factored out: ["ab", "ac"] -> a(?:b|c)."""
    trie: dict = {}
    for w in words:
        node = trie
        for c in w:
            node = node.setdefault(c, {})
        node[""] = {}

    def emit(node: dict) -> str:
        alts = [re.escape(c) + emit(child) for c, child in sorted(node.items()) if c]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body

    return emit(trie)


def _phrases(h: np.ndarray, doc: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every run of n consecutive words inside one document, and their
    start indices."""
    m = max(len(doc) - n + 1, 0)
    start = np.flatnonzero(doc[:m] == doc[n - 1 : n - 1 + m])
    out = h[start].copy()
    for j in range(1, n):
        out = out * _MUL + h[start + j]
    return out, start


class BadwordsFilter(Filter):
    name = "badwords"

    def __init__(self, cfg: BadwordsConfig):
        super().__init__()
        self.cfg = cfg
        self.words = load_words(cfg)
        zh = [w for w in self.words if _HAS_CJK.search(w)]
        self.zh_pattern = re.compile(trie_regex(zh), re.IGNORECASE) if zh else None
        # Word terms by length in words -> their hashes (computed like the text's).
        self.en_terms: dict[int, np.ndarray] = {}
        for term in (w for w in self.words if not _HAS_CJK.search(w)):
            h = Chars([term]).token_hashes(lowercase=True)
            if len(h):
                phrase, _ = _phrases(h, np.zeros(len(h), dtype=np.int64), len(h))
                self.en_terms.setdefault(len(h), []).append(phrase[0])
        self.en_terms = {n: np.unique(np.array(v, dtype=np.uint64)) for n, v in self.en_terms.items()}

    def hits(self, ch: Chars) -> np.ndarray:
        hits = np.zeros(ch.n, dtype=np.int64)
        if self.en_terms and ch.n:
            h, doc = ch.token_hashes(lowercase=True), ch.doc[ch.tokens[0]]
            for n, terms in self.en_terms.items():
                phrase, start = _phrases(h, doc, n)
                hits += np.bincount(doc[start[np.isin(phrase, terms)]], minlength=ch.n)
        if self.zh_pattern is not None and ch.n:
            pos = np.fromiter((m.start() for m in self.zh_pattern.finditer(ch.joined)), dtype=np.int64)
            hits += np.bincount(np.searchsorted(ch.starts, pos, side="right") - 1, minlength=ch.n)
        return hits

    @chunked
    def keep(self, texts: list[str]) -> tuple[np.ndarray, str]:
        ch = Chars(texts)
        hits = self.hits(ch)
        words = ch.latin_words + ch.counts[:, CJK] / self.cfg.zh_chars_per_word
        bad = (hits >= self.cfg.min_hits) & (safe_div(hits, words) > self.cfg.max_ratio)
        return ~bad, "bad_words"
