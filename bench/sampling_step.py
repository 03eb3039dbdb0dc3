#!/usr/bin/env python3
"""One decode step's token choice for a batch of sampling rows: zerolm's batched
sampler (serve/sampling.py: one inverse-CDF draw for all rows, each from its own seeded
stream) against HF `generate`'s sampling path (temperature, top-k and top-p logits
warpers, softmax, torch.multinomial), same logits, in one run. Prints JSON lines and
a table; ratio > 1 means zerolm is faster.

    python3 bench/sampling_step.py [--device cpu|cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench runs from a checkout

import torch  # noqa: E402
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,  # noqa: E402
                                                    TopKLogitsWarper, TopPLogitsWarper)

from serve.sampling import SamplingParams, sample  # noqa: E402

SETTINGS = {"temperature 1": dict(temperature=1.0), "top_p 0.9": dict(temperature=0.8, top_p=0.9),
            "top_k 50, top_p 0.95": dict(temperature=0.7, top_k=50, top_p=0.95)}


def hf_choose(logits: torch.Tensor, knobs: dict) -> torch.Tensor:
    warpers = LogitsProcessorList([TemperatureLogitsWarper(knobs["temperature"])]
                                  + ([TopKLogitsWarper(knobs["top_k"])] if knobs.get("top_k") else [])
                                  + ([TopPLogitsWarper(knobs["top_p"])] if knobs.get("top_p") else []))
    scores = warpers(None, logits)
    return torch.multinomial(torch.softmax(scores, dim=-1), 1)[:, 0]


def timed(fn, dev: torch.device, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        for _ in range(repeat):
            fn().tolist()  # the tokens go back to the host in both: stop checks need them
        best = min(best, (time.perf_counter() - t) / repeat)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    rows = []
    for vocab in (8000, 32000):
        for batch in (1, 8, 32):
            # logits of a trained model are peaked: scale random ones so a 0.9 nucleus is tens of tokens
            logits = torch.randn(batch, vocab, device=dev) * 4
            for name, knobs in SETTINGS.items():
                params = [SamplingParams(**knobs)] * batch
                streams = [random.Random(i) for i in range(batch)]
                ours = timed(lambda: sample(logits, params, [s.random() for s in streams]), dev, args.repeat)
                hf = timed(lambda: hf_choose(logits, knobs), dev, args.repeat)
                rows.append({"vocab": vocab, "batch": batch, "setting": name, "zerolm_ms": 1000 * ours,
                             "hf_ms": 1000 * hf, "ratio": hf / ours, "device": str(dev)})
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}),
                      flush=True)
    print(f"\n{'vocab':>6}{'batch':>6}  {'setting':<22}{'zerolm ms':>10}{'HF ms':>9}{'ratio':>7}")
    for r in rows:
        print(f"{r['vocab']:>6}{r['batch']:>6}  {r['setting']:<22}{r['zerolm_ms']:>10.3f}{r['hf_ms']:>9.3f}"
              f"{r['ratio']:>7.2f}")


if __name__ == "__main__":
    main()
