"""Character classes of the text statistics: one lookup table from code point to
class, so that every filter and the outlier pass agree on what a letter, a digit or
a symbol is.

Character classes (decided once, used everywhere):
  SPACE   str.isspace()
  CJK     Han ideographs (all extensions, compatibility), kana, hangul, bopomofo, 〇
  LATIN   letters of the Latin script (ASCII, Latin-1, Latin Extended A/B/additional)
  LETTER  letters and combining marks of any other script (Greek, Cyrillic, ...)
  DIGIT   any Unicode number (Nd/Nl/No: 0-9, ①, ², Ⅻ)
  PUNCT   prose punctuation: Unicode P* except the marks below (. , ; : ! ? ' " ( )
          [ ] { } - / and all CJK punctuation 。，、《》「」…… ·)
  SYMBOL  everything else: Unicode S* ($ + < = > | ~ ^ ` © ° emoji, box drawing,
          arrows), the ASCII marks # % & * @ \\ _ that prose rarely needs but
          markup, hashtags and spam use a lot, controls, private use, unassigned.
"""

from __future__ import annotations

import unicodedata

import numpy as np

SPACE, CJK, LATIN, LETTER, DIGIT, PUNCT, SYMBOL = range(7)
N_CLASSES = 7

_CJK_RANGES = (
    (0x2E80, 0x2FDF), (0x3005, 0x3007), (0x3040, 0x30FF), (0x3100, 0x312F), (0x3130, 0x318F),
    (0x31A0, 0x31FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF),
)
_LATIN_RANGES = (
    (0x41, 0x5A), (0x61, 0x7A), (0xAA, 0xAA), (0xBA, 0xBA), (0xC0, 0x24F), (0x1E00, 0x1EFF),
    (0x2C60, 0x2C7F), (0xA720, 0xA7FF), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A),
)
# ASCII punctuation (Unicode Po/Pc) that we count as symbols, see module docstring.
_SYMBOLIC_PUNCT = frozenset("#%&*@\\_")


# The same CJK set as a regex character class, for tokenizers working on strings.
CJK_CHARCLASS = "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in _CJK_RANGES + ((0x20000, 0x3FFFF),))


def _in(cp: int, ranges) -> bool:
    return any(lo <= cp <= hi for lo, hi in ranges)


def _classify(cp: int) -> int:
    ch = chr(cp)
    if ch.isspace():
        return SPACE
    cat = unicodedata.category(ch)
    if _in(cp, _CJK_RANGES) and (cat[0] in "LMN"):
        return CJK
    if cat[0] == "L" or cat[0] == "M":
        return LATIN if _in(cp, _LATIN_RANGES) else LETTER
    if cat[0] == "N":
        return DIGIT
    if cat[0] == "P" and ch not in _SYMBOLIC_PUNCT:
        return PUNCT
    return SYMBOL


# Lookup tables for the Basic Multilingual Plane (built once at import, ~60 ms).
_BMP = np.array([_classify(c) for c in range(0x10000)], dtype=np.uint8)
# Lower-case mapping of the BMP where it maps one character to one character.
_LOWER = np.array([ord(lc) if len(lc := chr(c).lower()) == 1 else c for c in range(0x10000)], dtype=np.uint32)


def classify(cp: np.ndarray) -> np.ndarray:
    """Class (uint8) of each code point (uint32)."""
    cls = _BMP[np.minimum(cp, 0xFFFF)]
    astral = cp > 0xFFFF
    if astral.any():
        # Planes 1-16: CJK extensions B-H are CJK, emoji/pictographs (U+1Fxxx) and
        # tags/private use symbols, the rest (historic scripts, math letters) letters.
        a = cp[astral]
        out = np.full(a.shape, LETTER, dtype=np.uint8)
        out[(a >= 0x1F000) & (a <= 0x1FFFF)] = SYMBOL
        out[(a >= 0x20000) & (a <= 0x3FFFF)] = CJK
        out[a >= 0xE0000] = SYMBOL
        cls[astral] = out
    return cls


def lower(cp: np.ndarray) -> np.ndarray:
    """Code points (as uint64) lower-cased where Unicode maps 1:1 (BMP)."""
    out = cp.astype(np.uint64)
    bmp = cp <= 0xFFFF
    out[bmp] = _LOWER[cp[bmp]]
    return out
