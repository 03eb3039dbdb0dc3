"""`zerolm data train-quality`: a fastText classifier of high- vs low-quality text.

The Skywork / CCNet-style recipe: a cheap linear classifier over word and word-bigram
embeddings, trained on a reference of "text we want" (encyclopedia, news) against
"text we have plenty of and want less of" (short user-generated text). Its P(high) is
the `quality_score` column of the `quality` step. The default recipe uses the test
data folder (../shared/data): CMRC 2018 contexts (Chinese Wikipedia), People's Daily
and English Wikipedia as high; product reviews and fortune-file quips as low.

Held-out precision/recall/F1 are computed on a hash split of the deduplicated texts
(high quality is the positive class), and written beside the model as MODEL.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
from pydantic import Field

from dataproc.config import InputSpec
from dataproc.quality import ftmodel
from dataproc.quality.corpus import labelled, split
from dataproc.quality.textprep import for_quality
from zerolm.config import StrictModel
from zerolm.errors import UserError
from zerolm.stage import write_json_atomic

HIGH, LOW = ftmodel.QUALITY_LABELS


class FastTextParams(StrictModel):
    """fastText's supervised options (its names). Small `bucket` and `dim` keep the
    model file at a few MB: hashed bigram buckets are most of a model's size."""

    dim: int = Field(default=32, ge=2)
    epoch: int = Field(default=10, ge=1)
    lr: float = Field(default=0.5, gt=0)
    wordNgrams: int = Field(default=2, ge=1)
    minCount: int = Field(default=1, ge=1)
    minn: int = Field(default=0, ge=0)
    maxn: int = Field(default=0, ge=0)
    bucket: int = Field(default=200_000, ge=0)
    # At least 10: fastText 0.9.3 initializes the input embeddings in ten blocks, one
    # per training thread (DenseMatrix::uniform), so with fewer threads most of the
    # matrix keeps whatever memory held and training diverges to NaN at random. (Its
    # SGD is lock-free across threads, so models differ slightly run to run.)
    thread: int = Field(default=10, ge=10)
    seed: int = 0


class QualityTrainConfig(StrictModel):
    positive: list[InputSpec] = Field(default_factory=list)
    negative: list[InputSpec] = Field(default_factory=list)
    output: str = ""
    # Documents shorter than this are not examples (the cleaning job drops them anyway).
    min_chars: int = Field(default=20, ge=1)
    # Characters of a document the model sees, in training and in the `quality` step.
    max_chars: int = Field(default=2000, ge=16)
    # Cap per source: one big source must not define what "high quality" means alone.
    max_docs_per_source: int = Field(default=5000, ge=1)
    balance: bool = True
    heldout: float = Field(default=0.1, gt=0, lt=1)
    fasttext: FastTextParams = Field(default_factory=FastTextParams)


def default_recipe(data_dir: str | Path) -> dict:
    """The issue's recipe on the shared test data folder (../shared/data)."""
    p = Path(data_dir) / "pretrain"
    if not p.is_dir():
        raise UserError(f"{data_dir} has no pretrain/ folder (expected the shared test data folder)")
    return {
        "positive": [
            {"path": str(p / "zh/cmrc2018_*.json"), "source": "cmrc2018", "text_field": "context_text"},
            {"path": str(p / "zh/peoples_daily_199801.txt"), "source": "peoples_daily"},
            {"path": str(p / "en/wiki_demo.txt"), "source": "wiki"},
        ],
        "negative": [
            {"path": str(p / "zh/reviews_*.txt"), "source": "reviews"},
            {"path": str(p / "zh/fortunes_zh.txt"), "source": "fortunes", "txt_mode": "separator"},
        ],
    }


def binary_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict:
    """Precision, recall and F1 of the positive class (bool arrays)."""
    tp = int(np.sum(truth & predicted))
    fp = int(np.sum(~truth & predicted))
    fn = int(np.sum(truth & ~predicted))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
            "accuracy": round(float(np.mean(truth == predicted)), 4) if len(truth) else 0.0, "n": int(len(truth))}


def evaluate(model, docs, max_chars: int, threshold: float = 0.5) -> dict:
    scores = ftmodel.prob_of(model, [for_quality(d.text, max_chars) for d in docs], HIGH)
    truth = np.array([d.label == HIGH for d in docs], dtype=bool)
    report = binary_metrics(truth, scores >= threshold)
    report["by_source"] = {}
    for source in sorted({d.source for d in docs}):
        idx = np.array([d.source == source for d in docs])
        report["by_source"][source] = {"n": int(idx.sum()), "label": docs[int(np.argmax(idx))].label,
                                       "accuracy": round(float(np.mean(truth[idx] == (scores[idx] >= threshold))), 4),
                                       "mean_score": round(float(scores[idx].mean()), 4)}
    return report


def train_quality(cfg: QualityTrainConfig, *, echo=print) -> dict:
    if not cfg.output:
        raise UserError("train-quality needs --output MODEL")
    if not cfg.positive or not cfg.negative:
        raise UserError("train-quality needs --positive and --negative inputs (or --default-recipe DATA_DIR)")
    started = time.time()
    docs = labelled({HIGH: cfg.positive, LOW: cfg.negative}, min_chars=cfg.min_chars,
                    max_docs_per_source=cfg.max_docs_per_source, balance=cfg.balance)
    train_docs, test_docs = split(docs, cfg.heldout)
    echo(f"quality: {len(train_docs)} training / {len(test_docs)} held-out documents")
    examples = [(d.label, for_quality(d.text, cfg.max_chars)) for d in train_docs]
    order = np.random.default_rng(cfg.fasttext.seed).permutation(len(examples))  # SGD wants mixed labels
    model = ftmodel.train([examples[i] for i in order], cfg.output, **cfg.fasttext.model_dump())
    report = {"kind": "quality", "model": str(Path(cfg.output).resolve()), "heldout": evaluate(model, test_docs, cfg.max_chars),
              "train_docs": len(train_docs), "max_chars": cfg.max_chars, "elapsed_s": round(time.time() - started, 2),
              "config": cfg.model_dump(mode="json")}
    write_json_atomic(Path(str(cfg.output) + ".json"), report)
    echo(format_report(report))
    return report


def format_report(report: dict) -> str:
    h = report["heldout"]
    lines = [f"held-out ({h['n']} docs, positive = high quality): precision {h['precision']:.3f}  "
             f"recall {h['recall']:.3f}  F1 {h['f1']:.3f}  accuracy {h['accuracy']:.3f}",
             f"{'source':<20}{'label':>6}{'docs':>7}{'accuracy':>10}{'mean P(hq)':>12}"]
    for source, s in h["by_source"].items():
        lines.append(f"{source[:19]:<20}{s['label']:>6}{s['n']:>7}{s['accuracy']:>10.3f}{s['mean_score']:>12.3f}")
    return "\n".join(lines)


def load_report(model_path: str | Path) -> Optional[dict]:
    try:
        return json.loads(Path(str(model_path) + ".json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
