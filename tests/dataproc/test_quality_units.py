"""Units of dataproc/quality without Ray: the n-gram LM is a proper distribution,
model files round-trip and fail clearly, histogram quantiles, curriculum buckets in
mixture weights, text preparation, and the steps on a plain DataFrame."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dataproc.base import DROP, TEXT
from dataproc.mixture import resolve_weights
from dataproc.quality import ftmodel, ngram, quantiles
from dataproc.quality.buckets import bucket_name, split_bucket
from dataproc.quality.perplexity import load_ppl_model
from dataproc.quality.steps import (
    LangidConfig, LangidStep, PerplexityConfig, PerplexityStep, QualityConfig, QualityStep,
)
from dataproc.quality.textprep import for_langid, for_quality
from zerolm.errors import UserError

TEXTS = ["我爱北京天安门。", "天安门上太阳升！", "我爱你，北京。", "hello world, hello 北京", "太阳 hello 北京"] * 3


def next_token_probs(lm: ngram.NgramLM, context: str, candidates: list[str]) -> np.ndarray:
    """p(candidate | context) for each candidate, read off token_logprobs."""
    sep = " " if context and context[-1].isascii() else ""
    docs = [context + (sep if c.isascii() else "") + c for c in candidates] + [context]
    logp, lens, _ = lm.token_logprobs(docs)
    starts = np.concatenate(([0], np.cumsum(lens + 1)[:-1]))
    n_ctx = lens[-1]
    return np.exp(logp[starts + n_ctx])  # the token right after the context; for `context` alone: EOS


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_kneser_ney_sums_to_one_over_the_vocabulary(order):
    lm = ngram.NgramLM.train(TEXTS, order)
    vocab = sorted({c for t in TEXTS for c in t if not c.isascii()} | {",", "hello", "world"})
    assert lm.vocab == len(vocab) + 2  # + EOS + the share of every unseen token
    for context in ["", "我爱", "北京", "hello", "太阳 hello", "没见过的上下文"]:
        p = next_token_probs(lm, context, vocab + ["龘"])  # + an unseen token, + EOS (last)
        assert p.sum() == pytest.approx(1.0, abs=1e-6), context
        assert (p > 0).all()


def test_perplexity_is_lower_in_domain_and_rarity_tracks_rare_tokens():
    lm = ngram.NgramLM.train(TEXTS * 10, 3)
    ppl, rarity = lm.score(["我爱北京天安门。", "门安天京北爱我。", "", "龘龘龘龘"])
    assert ppl[0] < ppl[1] < ppl[3]
    assert np.isnan(ppl[2]) and np.isnan(rarity[2])  # no tokens: no score
    assert rarity[3] > rarity[0]


def test_ngram_file_round_trip_and_bad_files(tmp_path):
    lm = ngram.NgramLM.train(TEXTS, 3)
    path = tmp_path / "lm.npz"
    ngram.save({"zh": lm}, path)
    models, header = ngram.read(path)
    assert header["format"] == ngram.FORMAT
    np.testing.assert_allclose(models["zh"].score(TEXTS)[0], lm.score(TEXTS)[0])
    model = load_ppl_model(path)
    assert load_ppl_model(path) is model  # cached per process
    ppl, _, lang = model.score(["我爱北京", "hello world"])
    assert lang.tolist() == ["zh", "en"] and np.isfinite(ppl[0]) and np.isnan(ppl[1])  # no en model in the file

    (tmp_path / "trunc.npz").write_bytes(path.read_bytes()[:200])
    (tmp_path / "text.npz").write_text("not a model")
    for name in ("trunc.npz", "text.npz", "missing.npz"):
        with pytest.raises(UserError, match="perplexity.model"):
            load_ppl_model(tmp_path / name)


def test_histogram_quantiles_match_numpy():
    rng = np.random.default_rng(0)
    values = np.exp(rng.normal(5, 1.5, 20_000))  # perplexity-like, log-normal
    groups = np.where(rng.random(20_000) < 0.3, "a/zh", "b/en").astype(object)
    parts = [quantiles.partial_histogram(groups[i:i + 1000], values[i:i + 1000]) for i in range(0, 20_000, 1000)]
    q = quantiles.quantiles(pd.concat(parts), [0.5, 0.9, 0.99], min_count=10)
    for g in ("a/zh", "b/en"):
        want = np.quantile(values[groups == g], [0.5, 0.9, 0.99], method="inverted_cdf")
        assert (np.array(q[g]) >= want).all()  # the upper edge of the quantile's bin (0.1% wide)
        np.testing.assert_allclose(q[g], want, rtol=1.5e-3)
        assert np.mean(values[groups == g] <= q[g][1]) >= 0.9  # "keep <= q" keeps at least q
    assert quantiles.quantiles(pd.concat(parts), [0.5], min_count=10**6) == {}


def test_bucket_weights_in_mixture_stages():
    tokens = {bucket_name("wiki", 0): 100, bucket_name("wiki", 1): 300, bucket_name("news", 0): 50,
              bucket_name("news", 1): 50}
    assert split_bucket("wiki@b1") == ("wiki", 1) and split_bucket("a@bc") == ("a@bc", None)
    # no buckets given: proportional to tokens, as without a curriculum
    w = resolve_weights({"name": "all"}, tokens)
    assert w["wiki@b1"] == pytest.approx(0.6)
    # a source weight is shared by its buckets
    w = resolve_weights({"name": "m", "weights": {"wiki": 1, "news": 1}}, tokens)
    assert w["wiki@b0"] + w["wiki@b1"] == pytest.approx(0.5) and w["wiki@b0"] == pytest.approx(0.125)
    # easy first: only bucket 0 of every source
    w = resolve_weights({"name": "easy", "weights": {"wiki": 1, "news": 1}, "buckets": [1, 0]}, tokens)
    assert w == pytest.approx({"wiki@b0": 0.5, "news@b0": 0.5})
    with pytest.raises(UserError, match="packed without"):
        resolve_weights({"name": "x", "buckets": [1, 0]}, {"wiki": 10})
    with pytest.raises(UserError, match="bucket 1"):
        resolve_weights({"name": "x", "buckets": [1]}, tokens)
    with pytest.raises(UserError, match="no training tokens"):
        resolve_weights({"name": "x", "weights": {"nosuch": 1}}, tokens)


def test_text_preparation():
    # Devanagari vowel signs are not alphanumeric to Python's regex \W; they must survive
    assert for_langid(["हिन्दी भाषा, 12!", "Hello\nWORLD ... 42", ""], 100) == ["हिन्दी भाषा", "hello world", ""]
    assert for_quality("我爱北京天安门！Hello 2023年", 100) == "我 爱 北京 天安门 ！ hello 0000 年"
    assert "\n" not in for_quality("第一行\n第二行", 100)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, shared_data):
    """Small real models: zh vs en language id, People's Daily vs reviews quality,
    and a perplexity model (a few hundred real sentences each)."""
    d = tmp_path_factory.mktemp("models")
    lines = lambda rel, n: [x for x in (shared_data / rel).read_text(encoding="utf-8").splitlines() if x][:n]  # noqa: E731
    zh, en = lines("lid/sentences/zh.txt", 400), lines("lid/sentences/en.txt", 400)
    ftmodel.train([("zh", x) for x in for_langid(zh, 500)] + [("en", x) for x in for_langid(en, 500)],
                  d / "lid.bin", dim=16, epoch=5, minn=2, maxn=3, bucket=10_000, lr=0.3)
    good, bad = lines("pretrain/zh/peoples_daily_199801.txt", 400), lines("pretrain/zh/reviews_neg.txt", 400)
    ftmodel.train([("hq", for_quality(t, 500)) for t in good] + [("lq", for_quality(t, 500)) for t in bad],
                  d / "q.bin", dim=16, epoch=5, bucket=10_000, lr=0.3)
    ngram.save({"zh": ngram.NgramLM.train(zh, 3), "en": ngram.NgramLM.train(en, 3)}, d / "ppl.npz")
    return d


def frame(texts, drop=None):
    return pd.DataFrame({"id": [str(i) for i in range(len(texts))], TEXT: texts, "source": "s",
                         DROP: pd.Series(drop or [None] * len(texts), dtype=object)})


def test_steps_on_a_dataframe(tiny_models):
    batch = frame(["我们今天去北京参观博物馆，这本书的内容非常丰富。", "We visit the museum today, and this book is full of ideas.",
                   "好", "dropped before"], drop=[None, None, None, "length:too_short"])
    out = LangidStep(LangidConfig(enabled=True, model=str(tiny_models / "lid.bin"), keep=["zh"],
                                  keep_und=False))(batch.copy())
    assert out["language"].tolist() == ["zh", "en", "und", None]  # "好": too few letters -> und
    assert out[DROP].tolist() == [None, "langid:other_language", "langid:undetermined", "length:too_short"]
    assert out[TEXT].iloc[1] == ""  # dropped rows lose their text, like any filter

    out = QualityStep(QualityConfig(enabled=True, model=str(tiny_models / "q.bin"), threshold=None))(batch.copy())
    assert out["quality_score"].notna().tolist() == [True, True, True, False]
    assert out[DROP].isna().sum() == 3  # threshold None: score only

    step = PerplexityStep(PerplexityConfig(enabled=True, model=str(tiny_models / "ppl.npz"), max_ppl={"zh": 1e-3}))
    out = step(batch.copy())
    assert out["ppl"].notna().tolist() == [True, True, True, False] and (out["rarity"].iloc[:3] > 0).all()
    assert out[DROP].tolist()[:2] == ["perplexity:perplexity", None]  # the ceiling is for zh only
    assert step.counts["perplexity"] == 2

    empty = QualityStep(QualityConfig(enabled=True, model=str(tiny_models / "q.bin")))(frame([]))
    assert "quality_score" in empty.columns and len(empty) == 0


def test_wrong_or_corrupt_fasttext_models(tiny_models, tmp_path):
    with pytest.raises(UserError, match="not a quality model"):
        ftmodel.check_quality_model(tiny_models / "lid.bin")
    with pytest.raises(UserError, match="not a language-id model"):
        ftmodel.check_langid_model(tiny_models / "q.bin")
    bad = tmp_path / "bad.bin"
    bad.write_bytes((tiny_models / "q.bin").read_bytes()[:1000])
    with pytest.raises(UserError, match="corrupt or truncated"):
        ftmodel.check_quality_model(bad)
    with pytest.raises(UserError, match="not found"):
        ftmodel.check_langid_model(tmp_path / "nope.bin", "langid.model")


def test_training_commands_reject_bad_input_with_one_line(tmp_path):
    import subprocess
    import sys

    from dataproc.quality.langid import read_sentences

    lid = tmp_path / "lid"
    lid.mkdir()
    (lid / "aa.txt").write_text("\n".join(f"sentence number {i} in aa" for i in range(30)), encoding="utf-8")
    (lid / "bb.txt").write_bytes(b"valid start\n\xff\xfe then invalid bytes\n")
    with pytest.raises(UserError, match=r"bb.txt is not UTF-8 \(invalid bytes at offset 12\)"):
        read_sentences(lid, [], 100)
    (lid / "bb.txt").write_text("one\n\n   \none\n", encoding="utf-8")  # 1 distinct sentence
    with pytest.raises(UserError, match="bb.txt has 1 distinct non-empty sentences"):
        read_sentences(lid, [], 100)
    with pytest.raises(UserError, match="no file for language"):
        read_sentences(lid, ["aa", "cc"], 100)

    bad = tmp_path / "p.jsonl"
    bad.write_text('{"text": 1}\n', encoding="utf-8")
    cases = [(["train-langid", "--input", str(tmp_path / "missing")], "is not a folder"),
             (["train-quality"], "needs --positive and --negative"),
             (["train-quality", "--positive", str(bad), "--negative", str(bad)], "no usable documents"),
             (["train-ppl"], "needs reference text")]
    for args, message in cases:
        proc = subprocess.run([sys.executable, "-m", "zerolm", "data", *args, "--output", str(tmp_path / "m.bin")],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert not (tmp_path / "m.bin").exists()  # nothing written
