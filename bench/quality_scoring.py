#!/usr/bin/env python3
"""Scoring throughput of the model-based steps (dataproc/quality/): documents/s per
core for `langid`, `quality` and `perplexity`, alone and chained as `zerolm data run`
chains them.

In-process and pinned to one core (sched_setaffinity, one BLAS/OpenMP thread): a
Ray Data job runs one such step chain per CPU, so cluster throughput is this number
times the cores. Documents are real text from ../shared/data (Chinese news, People's
Daily, reviews; English C4 and Wikipedia), shuffled together, scored in batches of
--batch-size after one warm-up batch (the model load is per process, not per batch,
and is reported apart). Prints one JSON line per measurement, then a table.

    python3 bench/quality_scoring.py --models DIR        # DIR/{quality.bin,lid.bin,ppl.npz}
    python3 bench/quality_scoring.py --train DIR         # train small models there first
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench runs from a checkout

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SOURCES = [("zh/news_sentences.txt", "news", {}), ("zh/peoples_daily_199801.txt", "peoples_daily", {}),
           ("zh/reviews_neg.txt", "reviews", {}), ("en/c4_demo.jsonl", "c4", {}),
           ("en/wiki_demo.txt", "wiki", {})]


def documents(data: Path, per_source: int) -> list[str]:
    from dataproc.config import InputSpec
    from dataproc.quality.corpus import read_texts

    specs = [InputSpec(path=str(data / "pretrain" / rel), source=src, **opts) for rel, src, opts in SOURCES]
    rows = read_texts(specs, min_chars=1, max_docs_per_source=per_source)
    texts = [t for _, t in rows]
    order = np.random.default_rng(0).permutation(len(texts))  # mixed zh/en batches, as in a real corpus
    return [texts[i] for i in order]


def train_models(data: Path, out: Path) -> None:
    from zerolm.cli import main

    out.mkdir(parents=True, exist_ok=True)
    main(["data", "train-quality", "--default-recipe", str(data), "--output", str(out / "quality.bin"),
          "--set", "max_docs_per_source=1500"])
    main(["data", "train-langid", "--input", str(data / "lid/sentences"), "--output", str(out / "lid.bin")])
    main(["data", "train-ppl", "--default-recipe", str(data), "--output", str(out / "ppl.npz"),
          "--set", "max_docs_per_source=4000"])


def make_steps(models: Path) -> dict:
    """Scoring-only configs (no thresholds), so every document is scored by every step."""
    from dataproc.quality.steps import (LangidConfig, LangidStep, PerplexityConfig, PerplexityStep,
                                        QualityConfig, QualityStep)

    lid = LangidStep(LangidConfig(enabled=True, model=str(models / "lid.bin")))
    qual = QualityStep(QualityConfig(enabled=True, model=str(models / "quality.bin"), threshold=None))
    ppl = PerplexityStep(PerplexityConfig(enabled=True, model=str(models / "ppl.npz")))
    return {"langid": [lid], "quality": [qual], "perplexity": [ppl], "all three": [lid, qual, ppl]}


def measure(name: str, steps: list, texts: list[str], batch_size: int, repeats: int) -> dict:
    from dataproc.quality import ftmodel, perplexity

    ftmodel._CACHE.clear()  # time the per-process model load too (once per worker)
    perplexity._CACHE.clear()
    batches = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]

    def run(batch: list[str]) -> None:
        df = pd.DataFrame({"id": [str(i) for i in range(len(batch))], "text": batch, "source": "x"})
        for step in steps:
            df = step(df)

    t = time.perf_counter()
    run(batches[0][:8])
    load_s = time.perf_counter() - t
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for batch in batches:
            run(batch)
        rates.append(len(texts) / (time.perf_counter() - t))
    chars = sum(len(x) for x in texts)
    best = max(rates)
    return {"bench": "quality_scoring", "steps": name, "docs": len(texts), "batch_size": batch_size,
            "docs_per_s_per_core": round(statistics.median(rates), 1), "best_docs_per_s": round(best, 1),
            "mchars_per_s_per_core": round(statistics.median(rates) * chars / len(texts) / 1e6, 3),
            "mean_chars_per_doc": round(chars / len(texts), 1), "model_load_s": round(load_s, 3),
            "repeats": repeats}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--models", type=Path, help="folder with quality.bin, lid.bin, ppl.npz")
    ap.add_argument("--train", type=Path, help="train the three models into this folder first")
    ap.add_argument("--per-source", type=int, default=1000, help="documents per source")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpu", type=int, default=0, help="the core to pin to")
    args = ap.parse_args()
    if args.train:
        train_models(args.data, args.train)
    models = args.models or args.train
    if models is None:
        ap.error("give --models DIR or --train DIR")
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    texts = documents(args.data, args.per_source)
    info = {"bench": "quality_scoring", "machine": os.uname().nodename, "cpus": os.cpu_count(),
            "pinned_to_core": args.cpu, "load_avg_1m": round(os.getloadavg()[0], 2), "docs": len(texts)}
    print(json.dumps(info), flush=True)
    results = []
    for name, steps in make_steps(models).items():
        r = measure(name, steps, texts, args.batch_size, args.repeats)
        results.append(r)
        print(json.dumps(r), flush=True)
    print(f"\n{'steps':<12}{'docs/s/core':>12}{'Mchars/s':>10}{'load s':>8}   ({len(texts)} docs, "
          f"{results[0]['mean_chars_per_doc']:.0f} chars each on average)")
    for r in results:
        print(f"{r['steps']:<12}{r['docs_per_s_per_core']:>12.1f}{r['mchars_per_s_per_core']:>10.3f}"
              f"{r['model_load_s']:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
