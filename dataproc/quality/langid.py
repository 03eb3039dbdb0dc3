"""`zerolm data train-langid`: a fastText language identifier.

Trained on one text file of sentences per language (`<iso code>.txt`, one sentence a
line: the layout of ../shared/data/lid/sentences, 75 languages), like fastText's own
lid.176: character n-grams (2-4) of letter-only, lower-cased text with a small
embedding, so that unseen words and scripts without spaces (Chinese, Japanese, Thai)
are still recognised from their character n-grams. Held-out sentences (a hash split
per language) give per-language accuracy, reported and written beside the model as
MODEL.json together with the accuracy on short snippets, which is what the `und`
threshold of the `langid` step guards against.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from pydantic import Field

from dataproc.quality import ftmodel
from dataproc.quality.classifier import FastTextParams
from dataproc.quality.corpus import text_hash
from dataproc.quality.textprep import for_langid, normalize
from zerolm.config import StrictModel
from zerolm.errors import UserError
from zerolm.stage import write_json_atomic


def _lid_params() -> FastTextParams:
    return FastTextParams(dim=32, epoch=15, lr=0.5, wordNgrams=1, minCount=2, minn=2, maxn=4, bucket=100_000)


class LangidTrainConfig(StrictModel):
    # A folder of <language>.txt files, one sentence per line.
    input: str = ""
    output: str = ""
    # Only these languages (file stems); empty = every file in the folder.
    languages: list[str] = Field(default_factory=list)
    max_sentences: int = Field(default=1000, ge=10)
    heldout: float = Field(default=0.1, gt=0, lt=1)
    max_chars: int = Field(default=500, ge=16)
    # Held-out sentences are also scored cut to this many characters (the `und` zone).
    short_chars: int = Field(default=20, ge=1)
    fasttext: FastTextParams = Field(default_factory=_lid_params)


MIN_SENTENCES = 20  # fewer leaves no held-out sentences to report the language's accuracy on


def read_sentences(folder: Path, languages: list[str], max_sentences: int) -> dict[str, list[str]]:
    if not folder.is_dir():
        raise UserError(f"train-langid: {folder} is not a folder of <language>.txt files")
    files = {p.stem: p for p in sorted(folder.glob("*.txt"))}
    missing = sorted(set(languages) - set(files))
    if missing:
        raise UserError(f"train-langid: no file for language(s) {missing} in {folder}")
    out = {}
    for lang in languages or sorted(files):
        path = files[lang]
        try:  # strict: replacement characters would train the model on garbage silently
            lines = path.read_bytes().decode("utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise UserError(f"train-langid: {path} is not UTF-8 (invalid bytes at offset {e.start})") from None
        seen = dict.fromkeys(s for s in (normalize(line).strip() for line in lines) if s)
        if len(seen) < MIN_SENTENCES:
            raise UserError(f"train-langid: {path} has {len(seen)} distinct non-empty sentences; a language "
                            f"needs at least {MIN_SENTENCES} (remove the file or add text)")
        out[lang] = list(seen)[:max_sentences]
    if len(out) < 2:
        raise UserError(f"train-langid: need at least two languages, found {sorted(out)} in {folder}")
    return out


def per_language_accuracy(model, sentences: dict[str, list[str]], max_chars: int) -> dict[str, dict]:
    out = {}
    for lang, items in sorted(sentences.items()):
        if not items:
            continue
        labels, _ = ftmodel.predict(model, for_langid(items, max_chars))
        predicted = [row[0] if row else "" for row in labels]
        wrong = [p for p in predicted if p != lang]
        confused = max(set(wrong), key=wrong.count) if wrong else None
        out[lang] = {"n": len(items), "accuracy": round(1 - len(wrong) / len(items), 4), "confused_with": confused}
    return out


def train_langid(cfg: LangidTrainConfig, *, echo=print) -> dict:
    if not cfg.input or not cfg.output:
        raise UserError("train-langid needs --input FOLDER and --output MODEL")
    started = time.time()
    data = read_sentences(Path(cfg.input), cfg.languages, cfg.max_sentences)
    train, test = [], {}
    for lang, items in data.items():
        test[lang] = [s for s in items if text_hash(s, "heldout") < cfg.heldout]
        train += [(lang, line) for line in for_langid([s for s in items if text_hash(s, "heldout") >= cfg.heldout],
                                                      cfg.max_chars) if line]
    order = np.random.default_rng(cfg.fasttext.seed).permutation(len(train))
    model = ftmodel.train([train[i] for i in order], cfg.output, **cfg.fasttext.model_dump())
    full = per_language_accuracy(model, test, cfg.max_chars)
    short = per_language_accuracy(model, {k: [s[:cfg.short_chars] for s in v] for k, v in test.items()}, cfg.max_chars)
    n = sum(v["n"] for v in full.values())
    report = {
        "kind": "langid", "model": str(Path(cfg.output).resolve()), "languages": sorted(data),
        "train_sentences": len(train), "heldout_sentences": n,
        "accuracy": round(sum(v["accuracy"] * v["n"] for v in full.values()) / max(n, 1), 4),
        "macro_accuracy": round(float(np.mean([v["accuracy"] for v in full.values()])), 4),
        "short_accuracy": round(sum(v["accuracy"] * v["n"] for v in short.values()) / max(n, 1), 4),
        "per_language": {lang: {**full[lang], f"accuracy_{cfg.short_chars}_chars": short[lang]["accuracy"]}
                         for lang in full},
        "elapsed_s": round(time.time() - started, 2), "config": cfg.model_dump(mode="json"),
    }
    write_json_atomic(Path(str(cfg.output) + ".json"), report)
    echo(format_report(report, cfg.short_chars))
    return report


def format_report(report: dict, short_chars: int = 20) -> str:
    per = report["per_language"]
    lines = [f"held-out: {report['heldout_sentences']} sentences in {len(per)} languages; accuracy "
             f"{report['accuracy']:.3f} (macro {report['macro_accuracy']:.3f}); first {short_chars} "
             f"characters only: {report['short_accuracy']:.3f}",
             f"{'lang':<6}{'n':>5}{'accuracy':>10}{f'@{short_chars} chars':>12}  most confused with"]
    for lang, v in sorted(per.items(), key=lambda kv: (kv[1]["accuracy"], kv[0])):
        lines.append(f"{lang:<6}{v['n']:>5}{v['accuracy']:>10.3f}{v[f'accuracy_{short_chars}_chars']:>12.3f}  "
                     f"{v['confused_with'] or '-'}")
    return "\n".join(lines)
