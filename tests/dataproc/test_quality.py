"""Model-based data quality end to end on real ../shared/data: the three models trained
from the CLI with held-out metrics, their steps inside `zerolm data run` on Ray Data,
clear errors for bad model files, and pack's curriculum buckets and ordering."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataproc.config import DataRunConfig
from dataproc.pack import PackConfig, run_pack
from dataproc.pipeline import run_data
from dataproc.quality.buckets import split_bucket
from dataproc.quality.perplexity import route
from dataproc.quality.stage import check_models
from train.data import PackedSplit, WindowSampler
from zerolm.cli import main
from zerolm.errors import UserError


@pytest.fixture(scope="module")
def models(shared_data, tmp_path_factory):
    """The three models, trained with the CLI on real data, capped to stay quick (the
    full-size default recipes are reported in docs/benchmarks.md)."""
    d = tmp_path_factory.mktemp("quality_models")
    assert main(["data", "train-quality", "--default-recipe", str(shared_data), "--output", str(d / "quality.bin"),
                 "--set", "max_docs_per_source=800"]) == 0
    assert main(["data", "train-langid", "--input", str(shared_data / "lid/sentences"), "--output",
                 str(d / "lid.bin"), "--set", "max_sentences=500"]) == 0
    assert main(["data", "train-ppl", "--default-recipe", str(shared_data), "--output", str(d / "ppl.npz"),
                 "--set", "max_docs_per_source=2000"]) == 0
    return d


def report(path):
    return json.loads(open(str(path) + ".json", encoding="utf-8").read())


def test_quality_classifier_heldout_metrics(models):
    h = report(models / "quality.bin")["heldout"]
    assert h["n"] >= 250
    assert h["precision"] >= 0.93 and h["recall"] >= 0.93 and h["f1"] >= 0.93
    for source, s in h["by_source"].items():
        assert s["accuracy"] >= 0.85, source


def test_langid_heldout_accuracy_per_language(models):
    r = report(models / "lid.bin")
    assert len(r["per_language"]) == 75
    assert r["accuracy"] >= 0.9 and r["macro_accuracy"] >= 0.9
    for lang in ("zh", "en", "ja", "ko", "ru", "ar", "de", "fr", "hi", "th"):
        assert r["per_language"][lang]["accuracy"] >= 0.9, lang
    assert r["short_accuracy"] < r["accuracy"]  # why short texts get `und`


def test_perplexity_model_separates_reference_from_noisy_text(models):
    r = report(models / "ppl.npz")
    zh, en, cmp = r["languages"]["zh"], r["languages"]["en"], r["compare"]
    assert zh["heldout_ppl"] < cmp["reviews (zh)"]["median_ppl"] < cmp["fortunes (zh)"]["median_ppl"]
    assert en["heldout_ppl"] < cmp["c4 (en)"]["median_ppl"]


def shared_inputs(data):
    p = data / "pretrain"
    return [{"path": str(p / "zh/news_sentences.txt"), "source": "news"},
            {"path": str(p / "en/c4_demo.jsonl"), "source": "c4"},
            {"path": str(p / "zh/reviews_neg.txt"), "source": "reviews"},
            {"path": str(p / "zh/fortunes_zh.txt"), "source": "fortunes", "txt_mode": "separator"},
            {"path": str(data / "lid/sentences/de.txt"), "source": "de"},
            {"path": str(data / "lid/sentences/fr.txt"), "source": "fr"}]


def model_config(models, out, data, **extra):
    return DataRunConfig.model_validate({
        "output": str(out), "read": {"inputs": shared_inputs(data)},
        "langid": {"enabled": True, "model": str(models / "lid.bin"), "keep": ["zh", "en"]},
        "quality": {"enabled": True, "model": str(models / "quality.bin"), "threshold": 0.5},
        "perplexity": {"enabled": True, "model": str(models / "ppl.npz"), "max_percentile": 90},
        **extra})


def read_output(out):
    return pa.concat_tables([pq.read_table(f) for f in sorted((out / "data").glob("*.parquet"))]).to_pandas()


@pytest.fixture(scope="module")
def scored_run(ray_session, models, shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("scored") / "clean"
    stats = run_data(model_config(models, out, shared_data), echo=lambda *_: None)
    return out, stats


def low_quality_share(source_stats: dict) -> float:
    """Share of a source's documents that the quality step saw and dropped: what it
    saw is what it dropped plus what reached the steps after it."""
    d = source_stats["dropped"]
    later = d.get("perplexity", 0) + sum(n for r, n in d.items() if r.startswith("outlier"))
    low = d.get("low_quality", 0)
    return low / max(1, low + later + source_stats["rows_out"])


def test_model_steps_inside_data_run(scored_run):
    out, stats = scored_run
    for scope in [stats] + list(stats["sources"].values()):
        assert scope["rows_in"] == scope["rows_out"] + sum(scope["dropped"].values()) + scope["rejected"]
    names = [s["step"] for s in stats["steps"]]
    assert names.index("exact_dedup") < names.index("langid") < names.index("quality") < names.index("perplexity")
    df = read_output(out)
    for col in ("language", "language_score", "quality_score", "ppl", "rarity"):
        assert df[col].notna().all(), col  # every kept document is scored
    assert set(df["language"]) <= {"zh", "en", "und"}
    assert (df["quality_score"] >= 0.5).all()
    src = stats["sources"]
    # other languages go, with their reason
    for lang in ("de", "fr"):
        assert src[lang]["dropped"].get("other_language", 0) >= 0.9 * src[lang]["rows_in"]
    # Most reviews that reach the classifier go (many are exact duplicates, gone before
    # it). news_sentences is Leipzig *web* text: news, but also fiction and blog lines,
    # which an encyclopedia/news-trained model rightly scores lower; the claim is the
    # ranking, not that every "news" sentence passes.
    assert low_quality_share(src["reviews"]) > 0.8
    assert low_quality_share(src["news"]) < 0.5
    assert low_quality_share(src["reviews"]) - low_quality_share(src["news"]) > 0.3
    assert (df.loc[df.source == "c4", "language"] == "en").mean() > 0.95


def test_perplexity_percentile_is_per_source(scored_run):
    out, stats = scored_run
    ceilings = stats["models"]["perplexity_ceilings"]
    assert {"news/zh", "c4/en"} <= set(ceilings)
    df = read_output(out)
    step = next(s for s in stats["steps"] if s["step"] == "perplexity")
    assert 0.05 * step["in"] < step["dropped"]["perplexity"] < 0.15 * step["in"]  # ~10% of what reached it
    lm_lang = route(df["text"].tolist())  # a group is a source *and* the LM that scored it
    for group, ceiling in ceilings.items():
        source, lang = group.split("/")
        rows = (df.source == source).to_numpy() & (lm_lang == lang)
        assert rows.any() and (df.loc[rows, "ppl"] <= ceiling * 1.000001).all(), group
    assert ceilings["c4/en"] > ceilings["news/zh"]  # word vs character perplexity: per group, not one number


def test_bad_model_files_fail_before_the_job(models, shared_data, tmp_path):
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes((models / "quality.bin").read_bytes()[:5000])
    cases = [({"quality": {"enabled": True, "model": str(tmp_path / "missing.bin")}}, "not found"),
             ({"quality": {"enabled": True, "model": str(truncated)}}, "corrupt or truncated"),
             ({"quality": {"enabled": True, "model": str(models / "lid.bin")}}, "not a quality model"),
             ({"langid": {"enabled": True, "model": str(models / "lid.bin"), "keep": ["xx"]}}, "no language"),
             ({"perplexity": {"enabled": True, "model": str(models / "quality.bin")}}, "not a readable perplexity")]
    for extra, message in cases:
        cfg = DataRunConfig.model_validate({"output": str(tmp_path / "out"),
                                            "read": {"inputs": shared_inputs(shared_data)[:1]}, **extra})
        with pytest.raises(UserError, match=message):
            run_data(cfg, echo=lambda *_: None)
        assert not (tmp_path / "out").exists()  # nothing started
    proc = subprocess.run([sys.executable, "-m", "zerolm", "data", "run", "--input", shared_inputs(shared_data)[0]["path"],
                           "--output", str(tmp_path / "out"), "--set", "quality.enabled=true",
                           "--set", f"quality.model={truncated}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "quality.model" in proc.stderr


def test_retrained_model_changes_the_run_hash(models, tmp_path):
    model = tmp_path / "q.bin"
    model.write_bytes((models / "quality.bin").read_bytes())
    cfg = DataRunConfig.model_validate({"quality": {"enabled": True, "model": str(model)}})
    before = check_models(cfg)
    os.utime(model, ns=(1, 10**18))
    assert check_models(cfg) != before  # so a finished run is redone, not skipped
    assert check_models(DataRunConfig()) == {}  # runs without models keep their old hash


def test_pack_buckets_by_ppl_and_easy_first_mixture(scored_run, tokenizer_dir, tmp_path):
    out, _ = scored_run
    easy_first = [{"name": "easy", "fraction": 0.5, "buckets": [1, 0, 0]}, {"name": "all", "fraction": 0.5}]
    m = run_pack(PackConfig(input=str(out), tokenizer=str(tokenizer_dir), output=str(tmp_path / "tokens"),
                            val_fraction=0.05, mixture=easy_first,
                            curriculum={"score": "ppl", "buckets": 3}), echo=lambda *_: None)
    train, val = m["splits"]["train"], m["splits"]["val"]
    assert {f"{s}@b{k}" for s in ("news", "c4", "reviews", "fortunes") for k in range(3)} <= set(train)
    # (a few de/fr documents may survive as `und`: their source is bucketed too)
    assert all(split_bucket(name)[1] is not None for name in train)
    assert "news" in val and all(split_bucket(name)[1] is None for name in val)  # val stays per source
    docs = [train[f"news@b{k}"]["docs"] for k in range(3)]
    assert min(docs) > 0.25 * sum(docs)  # tertiles
    assert len(m["curriculum"]["edges"]["news"]) == 2
    total = 8 * 1024
    sampler = WindowSampler(PackedSplit(tmp_path / "tokens", "train"), 64, mixture=m["mixture"], total_samples=total)
    first = {sampler.locate(g)[0] for g in range(0, total // 2, 7)}
    second = {sampler.locate(g)[0] for g in range(total // 2, total, 7)}
    assert first and all(name.endswith("@b0") for name in first)
    assert any(not name.endswith("@b0") for name in second)
    with pytest.raises(UserError, match="bucket weights"):
        run_pack(PackConfig(input=str(out), tokenizer=str(tokenizer_dir), output=str(tmp_path / "x"),
                            mixture=[{"name": "a", "buckets": [1, 0]}], curriculum={"score": "ppl", "buckets": 3}),
                 echo=lambda *_: None)
    with pytest.raises(UserError, match="no column 'nosuch'"):
        run_pack(PackConfig(input=str(out), tokenizer=str(tokenizer_dir), output=str(tmp_path / "y"),
                            curriculum={"score": "nosuch", "buckets": 2}), echo=lambda *_: None)


def test_pack_orders_documents_by_score(clean_corpus, tokenizer_dir, tmp_path):
    from tokenizers import Tokenizer

    m = run_pack(PackConfig(input=str(clean_corpus), tokenizer=str(tokenizer_dir), output=str(tmp_path / "tok"),
                            curriculum={"score": "length", "order": True}), echo=lambda *_: None)
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    sep = m["separator_id"]
    for split in ("train", "val"):
        for source, entry in m["splits"][split].items():
            ids = np.concatenate([np.fromfile(tmp_path / "tok" / s["file"], dtype=m["dtype"]) for s in entry["shards"]])
            cuts = np.flatnonzero(ids == sep)
            docs = np.split(ids, cuts + 1)[:-1]
            lengths = [len(tok.decode(d[:-1].tolist(), skip_special_tokens=False)) for d in docs]
            assert len(lengths) == entry["docs"] and lengths == sorted(lengths), (split, source)
