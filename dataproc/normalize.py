"""Symbol normalization: the first cleaning step, for Chinese and English text.

`Normalizer` rewrites the `text` column of live rows; every sub-step can be switched
off in `NormalizeConfig`. Sub-steps, in the order they run (the order matters for
idempotence, which is a hard requirement: normalize(normalize(x)) == normalize(x)):

1. strip_ansi     terminal escape sequences ("\\x1b[33m", OSC titles, lone ESC).
2. strip_control  C0/C1 controls except \\n and \\t, zero-width chars, BOM, soft
                  hyphen, bidi marks. \\r\\n and lone \\r (old Mac files), \\v, \\f,
                  NEL, U+2028/U+2029 become \\n, so lines never glue together.
3. fullwidth_ascii full-width letters/digits/symbols (U+FF01..FF5E) and U+3000 become
                  ASCII (also ￥￡.. and half-width ｡｢｣､ -> 。「」、), except the
                  context marks ，！？：；（） handled in step 7.
4. nfc            Unicode NFC, after 2-3 because removing a zero-width char or
                  narrowing "ｅ" can bring a base letter next to a combining mark.
5. t2s            traditional -> simplified Chinese (OpenCC 't2s'; off by default).
6. collapse_whitespace  other Unicode spaces -> " ", runs of spaces/tabs -> one
                  space, no trailing spaces per line, 3+ newlines -> 2, strip text.
                  With keep_indentation (default) the spaces/tabs that start a
                  line are kept: code and nested lists keep their structure.
7. punctuation_by_context  see below.
8. collapse_punctuation  runs of one mark longer than max_punct_repeat are cut to
                  max_punct_repeat; "...." -> "..." and "………" -> "……" (ellipses
                  are units). Brackets, quotes, '-', '=', '*', '#' are never cut
                  (code, Markdown, wiki headings).

Punctuation by context. Marks are ASCII , . ? ! : ; and their Chinese forms
，。？！：；. A *cluster* is a maximal run of marks and spaces/tabs. Its sides L and
R are the nearest characters before/after it that are not spaces, marks, brackets
()（） or curly quotes “”‘’ (those are see-through: "他来了(笑)." -> "。"), each
classified as C (Han, kana, bopomofo, CJK punctuation such as 、《》「」), A (a
Latin/Greek/Cyrillic letter) or X (anything else: digits, straight quotes, symbols,
a newline, the text's ends). A line's script is C if it has more CJK letters than
Latin words of 2+ letters, A if fewer, X on a tie.
  * L, R both C -> ASCII marks become Chinese ("中文,句子" -> "中文，句子");
    L, R both A -> Chinese marks become ASCII ("Hello，world" -> "Hello, world");
    unless the line's script is the other one ("支持Java，Python等语言" stays).
  * One side C or A, the other X -> the same, but only if the line's script agrees
    ("中文,句子." ends in "。"; "我们用Transformer。" and "It is called 中文." keep theirs).
  * Both X -> Chinese marks become ASCII in an A line ("3：0，and" -> "3:0, and");
    ASCII marks never become Chinese ("3.14", "1,000", "12:30", `print("中");`).
  * One side C and the other A -> unchanged ("DVD,现在", "ps：于丹"), so an English
    comma never becomes "，" by mistake, nor the reverse.
  "." in a run of dots (ellipsis) or right after a digit ("1.概述") never becomes
  "。". A cluster made Chinese loses its spaces; one made ASCII gets a space after
  it when a letter follows directly. Full-width "，" between digits is kept: in
  Chinese text it separates numbers ("65091040，65092140") more often than thousands.
Parentheses go by pairs (no newline or parenthesis inside), so a pair is never half
converted: its L/R are found the same way outside it, and when both are X the line's
script decides ("（A、B）" stays, "(注意)" -> "（注意）").
Every decision depends only on things this step and the later ones never change
(letters, CJK, digits, newlines, which characters are see-through), which is what
makes it idempotent. URLs/e-mails keep their marks: those sit between letters,
digits or '/'. Quotes “”‘’ are never changed.
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from typing import ClassVar

import pandas as pd
from pydantic import Field

from dataproc.base import TEXT, Step, live_mask
from zerolm.config import StrictModel


class NormalizeConfig(StrictModel):
    """One switch per sub-step (see the module docstring for what each does)."""

    enabled: bool = True
    nfc: bool = True
    fullwidth_ascii: bool = True
    punctuation_by_context: bool = True
    strip_control: bool = True
    strip_ansi: bool = True
    collapse_punctuation: bool = True
    max_punct_repeat: int = Field(default=3, ge=1)
    collapse_whitespace: bool = True
    keep_indentation: bool = True
    t2s: bool = False


# --- character classes (strings for use inside [...]) --------------------------
_CJK_LETTERS = (  # kana, bopomofo, Han
    "\u3040-\u30ff\u3100-\u312f\u31a0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
)
_CJK = _CJK_LETTERS + "\u3001\u3003-\u303f\uff61-\uff9f"  # + CJK punctuation but 。, half-width kana
_LAT = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u0370-\u03ff\u0400-\u04ff\u1e00-\u1eff"
_ASCII_MARKS, _ZH_MARKS = ",.?!:;", "，。？！：；"
_QS = _ASCII_MARKS + _ZH_MARKS + " \t"  # what a cluster is made of
_QS_CLS = re.escape(_QS)
_TO_ZH = str.maketrans(_ASCII_MARKS, _ZH_MARKS)
_TO_ASCII = str.maketrans(_ZH_MARKS, _ASCII_MARKS)
_CJK_CHAR = re.compile(f"[{_CJK}]")
_LAT_CHAR = re.compile(f"[{_LAT}]")
# Line counts use letters only: collapsing "、、、" must not change a line's script.
_CJK_RUN = re.compile(f"[{_CJK_LETTERS}][{_CJK_LETTERS}]*")
_LAT_WORD = re.compile(f"[{_LAT}][{_LAT}]+")  # 2+ letters: "（A、B）" is no English

# Brackets and curly quotes are "see-through" when looking for a cluster's context:
# "他来了(笑)." ends with "。", "He said “OK”，then" gets ",". Straight quotes are not
# (code: `print("中文");` must keep its ";").
_SEE_THROUGH = "()（）“”‘’"
_SKIP = frozenset(_QS + _SEE_THROUGH)
# Candidates: a maximal run of marks/spaces that holds an ASCII (Chinese) mark, has no
# Latin (CJK) letter right next to it and a CJK (Latin) letter or see-through char on
# one side; the callback then makes the full decision. Every pattern here starts
# with a single character class so that `re` can skip ahead fast (a leading
# lookbehind or `[...]+` makes it try every position: 3-10x slower).
_q = _QS_CLS
_start = rf"[{_q}](?<![{_q}][{_q}])(?:(?<=[{{m}}])|(?=[{_q}]*[{{m}}]))"  # a cluster with a mark
_rest = rf"[{_q}]*(?![{_q}])"
_ZH_CANDIDATE = re.compile(
    _start.format(m=re.escape(_ASCII_MARKS))
    + rf"(?:(?<=[{_CJK}{_SEE_THROUGH}][{_q}]){_rest}(?![{_LAT}])"
    + rf"|(?<![{_LAT}][{_q}]){_rest}(?=[{_CJK}{_SEE_THROUGH}]))"
)
# Towards ASCII also both-X clusters are candidates: "3：0" in an English line.
_ASCII_CANDIDATE = re.compile(_start.format(m=_ZH_MARKS) + rf"(?<![{_CJK}][{_q}]){_rest}(?![{_CJK}])")
_HAS_ASCII_MARK = re.compile(f"[{re.escape(_ASCII_MARKS)}]")
_HAS_ZH_MARK = re.compile(f"[{_ZH_MARKS}]")
_PAREN_PAIR = re.compile(r"[(（][^()（）\n]*[)）]")
_DIGITS = frozenset("0123456789")

# --- other sub-steps -------------------------------------------------------------
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b\n]*(?:\x07|\x1b\\)?|[@-Z\\-_])?")
# Line breaks in disguise become "\n"; other C0/C1 controls (not \t, \n), soft hyphen,
# zero-width chars, bidi controls and BOM are deleted. (Plain-string re.sub, not
# str.translate: translate() with a dict is ~10x slower on non-ASCII text.)
_BREAKS = "\x0b\x0c\r\x85\u2028\u2029"
_DELETE = "\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff"
_CONTROL_CHARS = re.compile(f"[{_DELETE}{_BREAKS}]")
_DELETE_RUN = re.compile(f"[{_DELETE}][{_DELETE}]*")
_BREAK_CHAR = re.compile(f"[{_BREAKS}]")

_FW_KEEP = set(map(ord, _ZH_MARKS + "（）"))  # decided by context, not blindly
_FW_TABLE = {c: chr(c - 0xFEE0) for c in range(0xFF01, 0xFF5F) if c not in _FW_KEEP}
_FW_TABLE.update({0x3000: " ", 0xFF61: "。", 0xFF62: "「", 0xFF63: "」", 0xFF64: "、"})
_FW_TABLE.update(zip(range(0xFFE0, 0xFFE7), "¢£¬¯¦¥₩"))
_FW_CHARS = "".join(map(chr, _FW_TABLE))  # nothing in it is special inside [...]
_FW_RUN = re.compile(f"[{_FW_CHARS}][{_FW_CHARS}]*")

_ODD_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_SPACE_RUN = re.compile("   *")
_INNER_SPACE_RUN = re.compile(r"(?<=[^\s])(?:[ \t]{2,}|\t)")  # not at a line start
_NEWLINE_RUN = re.compile("\n\n\n\n*")
_TRAILING_SPACES = re.compile("[ \t]+(?=\n)")
_NEWLINE = re.compile("\n")

_REPEATABLE = "!?,;:~！？。，；：、～"  # '.' and '…' are handled as ellipsis units
_DOTS, _ELLIPSES = re.compile(r"\.{4,}"), re.compile("…{3,}")


def _side(s: str, i: int, step: int) -> str:
    """Class ('C', 'A' or 'X') of the nearest character from s[i] in direction `step`
    that is not a space, mark, bracket or curly quote (the text's ends and newlines
    are 'X')."""
    n = len(s)
    while 0 <= i < n and s[i] in _SKIP:
        i += step
    if not 0 <= i < n:
        return "X"
    ch = s[i]
    return "C" if _CJK_CHAR.match(ch) else "A" if _LAT_CHAR.match(ch) else "X"


class _LineScript:
    """Dominant script of the line around a position, computed once per line: 'C'
    if it has more CJK letters than Latin words, 'A' if fewer, 'X' on a tie."""

    def __init__(self, s: str) -> None:
        self.s, self.cache = s, {}
        self.starts: list[int] = []  # line starts, found on first use (bisect: no rescans)

    def __call__(self, pos: int) -> str:
        if not self.starts:
            self.starts = [0, *(m.end() for m in _NEWLINE.finditer(self.s))]
        k = bisect.bisect_right(self.starts, pos) - 1
        if k not in self.cache:
            start = self.starts[k]
            end = self.starts[k + 1] - 1 if k + 1 < len(self.starts) else len(self.s)
            cjk = sum(map(len, _CJK_RUN.findall(self.s, start, end)))
            words = len(_LAT_WORD.findall(self.s, start, end))
            self.cache[k] = "C" if cjk > words else "A" if words > cjk else "X"
        return self.cache[k]


def _decide(s: str, a: int, b: int, line: _LineScript, both_x: str = "CA", current: str = "") -> str:
    """For the cluster or pair s[a:b] now in script `current` (if any): 'C' (use
    Chinese marks), 'A' (use ASCII marks) or 'X' (leave as is); when both sides are X
    only the scripts in `both_x` may win. The line is only counted when it matters."""
    sides = {_side(s, a - 1, -1), _side(s, b, 1)}
    if sides == {"C", "A"}:
        return "X"
    if sides == {"X"}:
        script = line(a)
        return script if script in both_x else "X"
    side = min(sides)  # the side that is not X ('A' < 'C' < 'X')
    if side == current:  # the only possible change is to what it is already
        return "X"
    script = line(a)
    if "X" in sides:  # one-sided: the line must agree
        return side if script == side else "X"
    return side if script in (side, "X") else "X"  # "Java，Python" stays in a Chinese line


def _to_zh(m: re.Match, line: _LineScript) -> str:
    s, a, b = m.string, m.start(), m.end()
    if _decide(s, a, b, line, both_x="") != "C":  # keeps "3.14", "1,000", "12:30"
        return m.group()
    out, changed = [], False
    for i in range(a, b):
        ch = s[i]
        if ch in _ASCII_MARKS and not (
            ch == "." and (s[i - 1 : i] == "." or s[i + 1 : i + 2] == "." or s[i - 1 : i] in _DIGITS)
        ):
            ch, changed = ch.translate(_TO_ZH), True
        out.append(ch)
    if not changed:  # only an ellipsis or a list number "1." here
        return m.group()
    return "".join(c for c in out if c not in " \t")  # Chinese marks take no spaces


def _to_ascii(m: re.Match, line: _LineScript) -> str:
    s, a, b = m.string, m.start(), m.end()
    if _decide(s, a, b, line) != "A":
        return m.group()
    out = m.group().translate(_TO_ASCII)
    if out[-1] in _ASCII_MARKS and _LAT_CHAR.match(s[b : b + 1]):
        out += " "  # "Hello，world" -> "Hello, world"
    return out


def _paren(m: re.Match, line: _LineScript) -> str:
    s, a, b = m.string, m.start(), m.end()
    current = {"（）": "C", "()": "A"}.get(s[a] + s[b - 1], "")
    script = _decide(s, a, b, line, current=current)
    if script == "X":
        return m.group()
    opening, closing = ("（", "）") if script == "C" else ("(", ")")
    return opening + s[a + 1 : b - 1] + closing


def _punctuation(s: str) -> str:
    if "（" in s or ("(" in s and _CJK_CHAR.search(s)):  # else nothing could change
        s = _PAREN_PAIR.sub(lambda m, ln=_LineScript(s): _paren(m, ln), s)
    # Cheap pre-checks first: most texts are all-CJK or all-Latin and skip both.
    if _HAS_ASCII_MARK.search(s) and _CJK_CHAR.search(s):
        s = _ZH_CANDIDATE.sub(lambda m, ln=_LineScript(s): _to_zh(m, ln), s)
    if _HAS_ZH_MARK.search(s) and _LAT_CHAR.search(s):
        s = _ASCII_CANDIDATE.sub(lambda m, ln=_LineScript(s): _to_ascii(m, ln), s)
    return s


def _whitespace(s: str, wide: bool, keep_indentation: bool) -> str:
    if wide and _ODD_SPACES.search(s):
        s = _ODD_SPACES.sub(" ", s)
    # `in` is a fast substring search; the regexes only run where needed.
    if keep_indentation:
        if "\t" in s or "  " in s:
            s = _INNER_SPACE_RUN.sub(" ", s)
        s = _TRAILING_SPACES.sub("", s) if (" \n" in s or "\t\n" in s) else s
    elif "\t" in s:
        s = s.replace("\t", " ")
    if not keep_indentation and "  " in s:
        s = _SPACE_RUN.sub(" ", s)
    if not keep_indentation and " \n" in s:  # after the line above, trailing runs are single spaces
        s = s.replace(" \n", "\n")
    if "\n\n\n" in s:
        s = _NEWLINE_RUN.sub("\n\n", s)
    return s.strip(" \n")


class Normalizer(Step):
    """Normalizes the text of live rows in place; see the module docstring."""

    name: ClassVar[str] = "normalize"

    def __init__(self, cfg: NormalizeConfig) -> None:
        self.cfg = cfg
        n = cfg.max_punct_repeat
        self._punct_run = re.compile(f"([{_REPEATABLE}])\\1{{{n},}}")
        self._opencc = None  # built on first use: loading its dictionaries is slow

    def _repeat(self, m: re.Match) -> str:  # a function: re reparses a r"\1\1\1" template per call
        return m.group(1) * self.cfg.max_punct_repeat

    def __getstate__(self) -> dict:  # ship to Ray workers without the OpenCC object
        return {**self.__dict__, "_opencc": None}

    def _t2s(self, text: str) -> str:
        if self._opencc is None:
            from opencc import OpenCC  # opencc-python-reimplemented; optional feature

            self._opencc = OpenCC("t2s")
        return self._opencc.convert(text)

    def normalize(self, text: str) -> str:
        cfg = self.cfg
        if not cfg.enabled:
            return text
        if cfg.strip_ansi and "\x1b" in text:
            text = _ANSI.sub("", text)
        if cfg.strip_control and _CONTROL_CHARS.search(text):
            text = _BREAK_CHAR.sub("\n", _DELETE_RUN.sub("", text.replace("\r\n", "\n")))
        wide = not text.isascii()  # O(1); most sub-steps only concern non-ASCII text
        if wide and cfg.fullwidth_ascii:  # translate runs only: translate() on all text is slow
            text = _FW_RUN.sub(lambda m: m.group().translate(_FW_TABLE), text)
        if wide and cfg.nfc:
            text = unicodedata.normalize("NFC", text)
        if wide and cfg.t2s:
            text = self._t2s(text)
        if cfg.collapse_whitespace:
            text = _whitespace(text, wide, cfg.keep_indentation)
        if wide and cfg.punctuation_by_context:
            text = _punctuation(text)
        if cfg.collapse_punctuation:
            text = self._punct_run.sub(self._repeat, text)
            if "...." in text or "………" in text:
                text = _ELLIPSES.sub("……", _DOTS.sub("...", text))
        return text

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        if not self.cfg.enabled or len(batch) == 0:
            return batch
        live = live_mask(batch)
        texts = batch[TEXT].tolist()
        out = [self.normalize(t) if ok and isinstance(t, str) else t for t, ok in zip(texts, live)]
        batch[TEXT] = pd.Series(out, index=batch.index, dtype=batch[TEXT].dtype)
        return batch
