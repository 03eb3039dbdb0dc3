"""`zerolm data train-ppl`: the perplexity model, and loading it in workers.

One file holds a Chinese character model and an English word model (ngram.py), each
trained on a trusted reference corpus (default recipe on ../shared/data: People's
Daily + CMRC 2018 Wikipedia contexts for Chinese, English Wikipedia for English).
A document is scored by the model of its script: Chinese if CJK characters are at
least half of its letters (the same cjk_ratio the script filter uses), else English.

The report (printed, and MODEL.json) gives the corpus perplexity of held-out reference
documents and the median perplexity of every comparison source: a model is useful
as a filter when held-out reference text scores well below the noisy sources.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
from pydantic import Field

from dataproc.config import InputSpec
from dataproc.filters.textstats import Chars, cjk_ratio
from dataproc.quality import ngram
from dataproc.quality.corpus import read_texts, text_hash
from dataproc.quality.ftmodel import file_fingerprint
from zerolm.config import StrictModel
from zerolm.errors import UserError
from zerolm.stage import write_json_atomic

LANGS = ("zh", "en")
_CACHE: dict = {}


def route(texts: list[str]) -> np.ndarray:
    """'zh' or 'en' per document, by script (see module docstring)."""
    if not texts:
        return np.zeros(0, dtype=object)
    return np.where(cjk_ratio(Chars(texts)) >= 0.5, "zh", "en").astype(object)


class PerplexityModel:
    """The loaded model file: score documents with the model of their script."""

    def __init__(self, models: dict[str, ngram.NgramLM], header: dict):
        self.models, self.header = models, header

    def score(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ppl, rarity, lm language) per document; NaN where the model of the
        document's script is not in the file."""
        lang = route(texts)
        ppl, rarity = np.full(len(texts), np.nan), np.full(len(texts), np.nan)
        for name, lm in self.models.items():
            idx = np.flatnonzero(lang == name)
            if len(idx):
                ppl[idx], rarity[idx] = lm.score([texts[i] for i in idx])
        return ppl, rarity, lang


def load_ppl_model(path: str | Path, what: str = "perplexity.model") -> PerplexityModel:
    """Loaded once per process (keyed by path, size and mtime); UserError on a
    missing or unreadable file."""
    if not str(path):
        raise UserError(f"{what}: no model file given")
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what}: model file {p} not found")
    key = tuple(file_fingerprint(p))
    cached = _CACHE.get(key[0])
    if cached and cached[0] == key:
        return cached[1]
    try:
        models, header = ngram.read(p)
    except (ValueError, OSError) as exc:
        raise UserError(f"{what}: {p} is not a readable perplexity model (corrupt, truncated or another kind "
                        f"of file?): {exc}")
    model = PerplexityModel(models, header)
    _CACHE[key[0]] = (key, model)
    return model


class PplTrainConfig(StrictModel):
    zh: list[InputSpec] = Field(default_factory=list)  # reference text of the character model
    en: list[InputSpec] = Field(default_factory=list)  # reference text of the word model
    output: str = ""
    # n-gram order per language; 3 = characters/words in the context of the two before.
    order: dict[str, int] = Field(default_factory=lambda: {"zh": 3, "en": 3})
    # Sources only scored in the report (is the noisy text above the reference?).
    compare: list[InputSpec] = Field(default_factory=list)
    min_chars: int = Field(default=20, ge=1)
    max_docs_per_source: int = Field(default=100_000, ge=1)
    heldout: float = Field(default=0.05, gt=0, lt=1)
    max_chars: int = Field(default=100_000, ge=100)


def default_recipe(data_dir: str | Path) -> dict:
    p = Path(data_dir) / "pretrain"
    if not p.is_dir():
        raise UserError(f"{data_dir} has no pretrain/ folder (expected the shared test data folder)")
    return {
        "zh": [{"path": str(p / "zh/peoples_daily_199801.txt"), "source": "peoples_daily"},
               {"path": str(p / "zh/cmrc2018_*.json"), "source": "cmrc2018", "text_field": "context_text"}],
        "en": [{"path": str(p / "en/wiki_demo.txt"), "source": "wiki"}],
        "compare": [{"path": str(p / "zh/reviews_*.txt"), "source": "reviews"},
                    {"path": str(p / "zh/fortunes_zh.txt"), "source": "fortunes", "txt_mode": "separator"},
                    {"path": str(p / "zh/news_sentences.txt"), "source": "news"},
                    {"path": str(p / "en/c4_demo.jsonl"), "source": "c4"},
                    {"path": str(p / "en/tiny_shakespeare.txt"), "source": "shakespeare", "txt_mode": "paragraph"}],
    }


def _corpus_ppl(lm: ngram.NgramLM, texts: list[str]) -> float:
    """exp(total NLL / total predicted tokens) over documents (token-weighted)."""
    ppl, _ = lm.score(texts)
    _, lens = ngram.tokenize(texts, lm.max_chars)
    ok = ~np.isnan(ppl)
    n = (lens[ok] + 1).astype(np.float64)
    return float(math.exp(np.sum(np.log(ppl[ok]) * n) / max(n.sum(), 1)))


def train_ppl(cfg: PplTrainConfig, *, echo=print) -> dict:
    if not cfg.output:
        raise UserError("train-ppl needs --output MODEL")
    refs = {lang: getattr(cfg, lang) for lang in LANGS if getattr(cfg, lang)}
    if not refs:
        raise UserError("train-ppl needs reference text: --zh and/or --en inputs (or --default-recipe DATA_DIR)")
    started = time.time()
    models, report = {}, {"kind": "perplexity", "model": str(Path(cfg.output).resolve()), "languages": {}}
    for lang, inputs in refs.items():
        rows = read_texts(inputs, min_chars=cfg.min_chars, max_docs_per_source=cfg.max_docs_per_source)
        train = [t for _, t in rows if text_hash(t, "heldout") >= cfg.heldout]
        test = [(s, t) for s, t in rows if text_hash(t, "heldout") < cfg.heldout]
        if not train:
            raise UserError(f"train-ppl: no {lang} reference documents of at least {cfg.min_chars} characters")
        lm = ngram.NgramLM.train(train, cfg.order.get(lang, 3), cfg.max_chars)
        models[lang] = lm
        report["languages"][lang] = {
            "order": lm.order, "train_docs": len(train), "train_tokens": lm.meta["train_tokens"],
            "types": lm.vocab - 1, "heldout_docs": len(test),
            "heldout_ppl": round(_corpus_ppl(lm, [t for _, t in test]), 2) if test else None,
            "heldout_median_ppl": {s: round(float(np.nanmedian(lm.score([t for src, t in test if src == s])[0])), 2)
                                   for s in sorted({s for s, _ in test})},
        }
    model = PerplexityModel(models, {})
    report["compare"] = {}
    for spec in cfg.compare:
        rows = read_texts([spec], min_chars=cfg.min_chars, max_docs_per_source=5000)
        if rows:
            ppl, _, lang = model.score([t for _, t in rows])
            for name in sorted(set(lang)):
                vals = ppl[(lang == name) & ~np.isnan(ppl)]
                if len(vals):
                    report["compare"][f"{rows[0][0]} ({name})"] = {"docs": int(len(vals)),
                                                                    "median_ppl": round(float(np.median(vals)), 2)}
    report["elapsed_s"] = round(time.time() - started, 2)
    report["config"] = cfg.model_dump(mode="json")
    ngram.save(models, cfg.output, extra={"report": {k: v for k, v in report.items() if k != "config"}})
    write_json_atomic(Path(str(cfg.output) + ".json"), report)
    echo(format_report(report))
    return report


def format_report(report: dict) -> str:
    lines = [f"{'model':<8}{'order':>6}{'train tokens':>14}{'types':>9}{'held-out ppl':>14}  median by source"]
    for lang, r in report["languages"].items():
        med = ", ".join(f"{s}={v}" for s, v in r["heldout_median_ppl"].items())
        lines.append(f"{lang:<8}{r['order']:>6}{r['train_tokens']:>14}{r['types']:>9}{r['heldout_ppl'] or float('nan'):>14.1f}  {med}")
    if report.get("compare"):
        lines.append("comparison sources (median ppl): " + ", ".join(
            f"{name}={v['median_ppl']}" for name, v in report["compare"].items()))
    return "\n".join(lines)
