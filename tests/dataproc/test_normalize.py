"""Symbol normalization (dataproc/normalize.py): concrete behaviours on real zh/en
snippets, idempotence on every line of the shared corpora and on random mixed
strings, batch handling (dropped rows untouched), config strictness. No Ray needed."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from dataproc.base import DROP, TEXT
from dataproc.normalize import NormalizeConfig, Normalizer

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
PRETRAIN = DATA / "pretrain"
needs_data = pytest.mark.skipif(not PRETRAIN.is_dir(), reason=f"shared test data not found at {DATA}")


def norm(text: str, **cfg) -> str:
    return Normalizer(NormalizeConfig(**cfg)).normalize(text)


def read_lines(rel: str) -> list[str]:
    path = PRETRAIN / rel
    if path.suffix == ".jsonl":
        return [json.loads(line)["text"] for line in path.open(encoding="utf-8")]
    with path.open(encoding="utf-8", newline="") as f:  # keep "\r" as the reader would
        return f.read().split("\n")


# --- concrete behaviours -------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        # full-width digits/letters/space -> ASCII (People's Daily style)
        ("１２月３１日，中共中央总书记", "12月31日，中共中央总书记"),
        ("比上年增长１２．５％。", "比上年增长12.5%。"),
        ("ＡＢＣ　ｄｅｆ", "ABC def"),
        # punctuation by context
        ("Hello，world！", "Hello, world!"),
        ("中文,句子.", "中文，句子。"),
        ("花钱去买, 不值得, 建议要买的人三思", "花钱去买，不值得，建议要买的人三思"),
        ("当下中国庸俗文学(不是通俗文学!)屡屡盛行", "当下中国庸俗文学（不是通俗文学！）屡屡盛行"),
        ("他来了(笑).", "他来了（笑）。"),
        ("Hello（world）！", "Hello(world)!"),
        ("He said “OK”，then left。", "He said “OK”, then left."),
        ("The score was 3：0，and then", "The score was 3:0, and then"),
        # things that must not change
        ("3.14", "3.14"),
        ("圆周率约为3.14，", "圆周率约为3.14，"),
        ("1.概述", "1.概述"),
        ("他说...然后", "他说...然后"),
        ("访问www.baidu.com或写信给a.b@x.cn.", "访问www.baidu.com或写信给a.b@x.cn."),
        ("文件名是test.txt中", "文件名是test.txt中"),
        ("例如e.g.中文", "例如e.g.中文"),
        ("我们使用了Transformer。", "我们使用了Transformer。"),  # Chinese sentence, English word
        ("的模型（Transformer）。", "的模型（Transformer）。"),
        ("It is called 中文.", "It is called 中文."),  # English sentence, Chinese word
        ("一直没来得及看DVD,现在才发现", "一直没来得及看DVD,现在才发现"),  # mixed: keep
        ("ps：于丹名气这么大", "ps：于丹名气这么大"),
        ("支持Java，Python，Ruby等语言", "支持Java，Python，Ruby等语言"),
        ('print("中文");', 'print("中文");'),
        ("电话：６５０９１０４０，６５０９２１４０。", "电话：65091040，65092140。"),
        ("“你好”‘吗’", "“你好”‘吗’"),
        # ANSI, control, zero-width
        ("\x1b[33m作者：张九龄\x1b[m", "作者：张九龄"),
        ("\x1b[32m《感遇二首其一》\x1b[m", "《感遇二首其一》"),
        ("ab\u200bc\u200d\ufeffd\u00ad\x00e\x07", "abcde"),
        ("line1\r\nline2\rline3", "line1\nline2\nline3"),
        # collapsing
        ("太差了！！！！！！", "太差了！！！"),
        ("笑声。。。。。。看了", "笑声。。。看了"),
        ("Really!!!!!!", "Really!!!"),
        ("等等......然后", "等等...然后"),
        ("等等……然后", "等等……然后"),  # the Chinese ellipsis is one unit of two
        ("等等…………然后", "等等……然后"),
        ("------", "------"),  # separators / Markdown are not punctuation runs
        # whitespace
        ("a  b\t\tc   \n\n\n\nd  ", "a b c\n\nd"),
        ("x\u00a0y\u3000z", "x y z"),
        # NFC
        ("e\u0301", "é"),
        ("ｅ\u0301", "é"),  # narrowed first, then composed
        ("e\u200b\u0301", "é"),  # zero-width removed first, then composed
    ],
)
def test_concrete(raw, expected):
    assert norm(raw) == expected


def test_peoples_daily_first_paragraphs():
    raw = "１２月３１日，中共中央总书记、国家主席江泽民发表１９９８年新年讲话《迈向充满希望的新世纪》。（新华社记者兰红光摄）"
    assert norm(raw) == "12月31日，中共中央总书记、国家主席江泽民发表1998年新年讲话《迈向充满希望的新世纪》。（新华社记者兰红光摄）"
    # A Chinese line keeps its Chinese punctuation and full-width parentheses.
    assert norm("（一九九七年十二月三十一日）") == "（一九九七年十二月三十一日）"
    assert norm("（Ａ、Ｂ）") == "（A、B）"


def test_t2s_only_when_enabled():
    assert norm("漢字", t2s=True) == "汉字"
    assert norm("漢字") == "漢字"
    assert NormalizeConfig().t2s is False


def test_switches_turn_sub_steps_off():
    assert norm("１２", fullwidth_ascii=False) == "１２"
    assert norm("中文,句子.", punctuation_by_context=False) == "中文,句子."
    assert norm("a\u200bb", strip_control=False) == "a\u200bb"
    assert norm("！！！！！", collapse_punctuation=False) == "！！！！！"
    assert norm("！！！！！", max_punct_repeat=1) == "！"
    assert norm("a   b", collapse_whitespace=False) == "a   b"
    assert norm("e\u0301", nfc=False) == "e\u0301"
    # Without strip_ansi the ESC is still a control char, but the "[33m" stays.
    assert norm("\x1b[33m诗\x1b[m", strip_ansi=False) == "[33m诗[m"
    raw = "１２\x1b[m  ！！！！"
    assert norm(raw, enabled=False) == raw


def test_config_is_strict():
    with pytest.raises(ValidationError):
        NormalizeConfig(fullwidth=True)  # misspelt key
    with pytest.raises(ValidationError):
        NormalizeConfig(max_punct_repeat=0)


# --- batches -------------------------------------------------------------------


def test_batch_leaves_dropped_rows_untouched():
    batch = pd.DataFrame(
        {
            "id": [0, 1, 2],
            TEXT: ["１２月，Hello，world", "中文,句子.", "  ！！！！！ "],
            DROP: [None, "too_short", None],
        }
    )
    out = Normalizer(NormalizeConfig())(batch)
    assert out[TEXT].tolist() == ["12月，Hello, world", "中文,句子.", "！！！"]
    assert out[DROP].tolist()[1] == "too_short"
    assert out["id"].tolist() == [0, 1, 2]


def test_batch_without_drop_column_and_empty_batch():
    n = Normalizer(NormalizeConfig())
    out = n(pd.DataFrame({TEXT: ["ａｂｃ", "x\r\ny"]}))
    assert out[TEXT].tolist() == ["abc", "x\ny"]
    assert len(n(pd.DataFrame({TEXT: pd.Series([], dtype=object)}))) == 0


def test_pickles_for_ray_workers():
    n = Normalizer(NormalizeConfig(t2s=True))
    assert n.normalize("漢字") == "汉字"  # builds the converter
    clone = pickle.loads(pickle.dumps(n))
    assert clone.normalize("後來") == "后来"


# --- idempotence ---------------------------------------------------------------

REAL_FILES = [
    "zh/peoples_daily_199801.txt",
    "zh/reviews_neg.txt",
    "zh/fortunes_zh.txt",
    "en/wiki_demo.txt",
    "en/c4_demo.jsonl",
    "en/tiny_shakespeare.txt",
]


@needs_data
@pytest.mark.parametrize("rel", REAL_FILES)
def test_idempotent_on_real_text(rel):
    n = Normalizer(NormalizeConfig())
    lines = read_lines(rel)
    once = [n.normalize(x) for x in lines]
    bad = [(x, y) for x, y in zip(lines, once) if n.normalize(y) != y]
    assert not bad, f"{len(bad)} lines of {rel} change on a second pass, e.g. {bad[0][0][:200]!r}"


@needs_data
def test_idempotent_with_t2s_on_poems():
    n = Normalizer(NormalizeConfig(t2s=True))
    for line in read_lines("zh/tang300.txt"):
        once = n.normalize(line)
        assert n.normalize(once) == once


@needs_data
@pytest.mark.parametrize("rel", ["en/wiki_demo.txt", "en/tiny_shakespeare.txt"])
def test_english_changes_only_whitespace(rel):
    n = Normalizer(NormalizeConfig())
    for line in read_lines(rel):
        # str.split() splits on any Unicode space, so equal word lists = same text
        # up to whitespace (NBSP -> space, runs collapsed, ends stripped).
        assert n.normalize(line).split() == line.split()


@needs_data
def test_peoples_daily_keeps_chinese_punctuation():
    n = Normalizer(NormalizeConfig())
    text = "\n".join(read_lines("zh/peoples_daily_199801.txt")[:2000])
    out = n.normalize(text)
    for mark in "，。？！：；（）":
        assert out.count(mark) == text.count(mark), mark
    assert not any(0xFF10 <= ord(c) <= 0xFF19 for c in out)  # no full-width digits left


POOL = (
    list("中文句子汉字漢語後來們了的是ひら") + list("abcXYZéβд") + list("0123456789") + list(",.?!:;()")
    + list("，。？！：；（）、《》「」“”‘’…—·~～") + list("１２ＡＢｅ＂＇．％＼［　")
    + ["\x1b[33m", "\x1b[m", "\x1b]0;t\x07", "\x1b", "[", "m", "\x00", "\x07", "\x85", "\x9b", "\u200b",
       "\u200d", "\ufeff", "\u00ad", "\u202e", "\r", "\r\n", "\n", "\n\n\n", "\t", " ", "  ", "\u00a0",
       "\u2028", "\u0301", "\u0338", "<", "=", "\u037e", "\uf900", "\u2126", "\U00020000", '"', "'",
       "-", "...", "……", "!!!!", "。。。。", "http://a.cn/x.html", "e.g.", "3.14"]
)


@pytest.mark.parametrize(
    "cfg",
    [{}, {"max_punct_repeat": 1}, {"collapse_whitespace": False}, {"strip_control": False},
     {"strip_ansi": False}, {"fullwidth_ascii": False}, {"nfc": False}, {"collapse_punctuation": False}],
    ids=str,
)
def test_idempotent_on_random_mixed_strings(cfg):
    rng = np.random.default_rng(1234)
    n = Normalizer(NormalizeConfig(**cfg))
    for _ in range(3000):
        s = "".join(POOL[i] for i in rng.integers(0, len(POOL), rng.integers(0, 40)))
        once = n.normalize(s)
        assert n.normalize(once) == once, repr(s)
