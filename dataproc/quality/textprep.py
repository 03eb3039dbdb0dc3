"""Turning a document into the one line of tokens a fastText model reads.

Training and scoring must prepare text identically, so both go through here:
  * the pipeline's own Normalizer first (training text is normalized the same way the
    corpus is before it is scored: full-width ASCII, control characters, ANSI codes);
  * the first `max_chars` characters only: a quality or language judgement does not
    need a whole book, and segmentation is the costliest part of scoring;
  * lower case, digits folded to 0 (numbers are facts, not style), one line;
  * quality: Chinese segmented into words with jieba (fastText splits on spaces, and
    Chinese has none); language id: no segmentation (it must not presuppose Chinese)
    — fastText's character n-grams of each space-separated chunk carry the signal.
"""

from __future__ import annotations

import logging
import re

import numpy as np

from dataproc.filters.charclass import DIGIT, PUNCT, SPACE, SYMBOL, classify, lower
from dataproc.normalize import NormalizeConfig, Normalizer

_NORMALIZER = Normalizer(NormalizeConfig())
_DIGITS = re.compile(r"\d")
_SPACES = re.compile(r"\s+")
_jieba = None


def normalize(text: str) -> str:
    """The corpus normalization (for training text that did not go through the pipeline)."""
    return _NORMALIZER.normalize(text)


def _segmenter():
    global _jieba
    if _jieba is None:
        import jieba

        jieba.setLogLevel(logging.WARNING)  # its "Building prefix dict" banner, once per process
        jieba.initialize()
        _jieba = jieba
    return _jieba


def for_quality(text: str, max_chars: int) -> str:
    """One line of lower-case tokens; Chinese segmented into words by jieba."""
    text = _DIGITS.sub("0", text[:max_chars].lower())
    if not text.isascii():
        text = " ".join(_segmenter().lcut(text, HMM=False))
    return _SPACES.sub(" ", text).strip()


def for_langid(texts: list[str], max_chars: int) -> list[str]:
    """Letters (and combining marks) only, lower case, one line each: digits,
    punctuation and symbols say nothing of the language. Vectorised over the batch
    with the pipeline's character classes (a regex `\\W` would cut Devanagari or
    Tamil words at every vowel sign, which Python does not count as alphanumeric)."""
    if not texts:
        return []
    joined = "\n".join(t[:max_chars] for t in texts)
    cp = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    cls = classify(cp)
    out = lower(cp).astype(np.uint32)
    cuts = np.cumsum([min(len(t), max_chars) + 1 for t in texts]) - 1
    out[(cls == DIGIT) | (cls == PUNCT) | (cls == SYMBOL) | (cls == SPACE)] = 32
    out[cuts[:-1]] = 10  # the separators (a text's own newlines became spaces above)
    lines = out.tobytes().decode("utf-32-le", "surrogatepass").split("\n")
    return [_SPACES.sub(" ", line).strip() for line in lines]
