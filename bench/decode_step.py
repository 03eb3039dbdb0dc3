#!/usr/bin/env python3
"""Where a served decode step's time goes, without HTTP: the engine alone at batch 1,
8 and 32 (eager, and with CUDA graphs on a GPU), and the masked attention call of a
decode step under each SDPA backend.

The H200 serving run decoded 8 and 32 concurrent requests together (p50 and p99
latency within 2%), yet a step took 70-100 ms against 8.7 ms at batch 1. This script
tells an engine-side cause (slow step at batch > 1; one attention backend slow on
every new key length) from an HTTP-side one. Prints JSON lines and a table.

    python3 bench/decode_step.py --model RUN/hf [--new-tokens 128] [--prompt-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench runs from a checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def engine_rows(model_dir: str, prompt_tokens: int, new_tokens: int) -> list[dict]:
    """The serving loop's decode (one long-lived batch, as BatchLoop keeps) at batch 1, 8
    and 32: eager; eager in the padded shapes CUDA graphs use ("static"); and on a GPU
    with the graphs. Also whether each mode generated the same greedy tokens as the one
    it should match (graphs: static, bit for bit; static: eager, up to rounding)."""
    from serve.engine import Engine, Request
    from serve.loading import load_model
    from serve.sampling import SamplingParams

    loaded = load_model("m", model_dir)
    text = Path(__file__).read_text(encoding="utf-8") * 8  # any real text; this file will do
    modes = ["eager", "static"] + (["graphs"] if loaded.device.type == "cuda" else [])
    reference = {"static": "eager", "graphs": "static"}
    rows, outputs = [], {}
    for mode in modes:
        eng = Engine(loaded, max_batch=64, cuda_graphs=mode == "graphs", static_shapes=mode == "static")
        ids = eng.encode(text)
        batch = eng.new_batch(rows=64)
        for size in (1, 8, 32):
            reqs = [Request(ids[i * 7: i * 7 + prompt_tokens], SamplingParams(max_tokens=new_tokens, temperature=0))
                    for i in range(size)]
            got: dict[int, list[int]] = {}
            for timed in (False, True):  # the first run warms up (and captures the graphs)
                sync(eng.m.device)
                t = time.perf_counter()
                eng.prefill(batch, reqs, [(lambda i: lambda res: got.__setitem__(i, res.output_ids))(i)
                                          for i in range(size)])
                while batch:
                    eng.step(batch)
                sync(eng.m.device)
                secs = time.perf_counter() - t
            outputs[mode, size] = [got[i] for i in range(size)]
            row = {"what": f"engine_{mode}", "batch": size, "step_ms": 1000 * secs / new_tokens,
                   "tokens_per_s": size * new_tokens / secs, "device": str(eng.m.device)}
            if mode in reference:
                ref = outputs[reference[mode], size]
                row["same_tokens_as_" + reference[mode]] = sum(a == b for x, y in zip(ref, outputs[mode, size])
                                                               for a, b in zip(x, y)) / (size * new_tokens)
            if mode == "graphs":
                row["graphs_captured"], row["graphs_on"] = batch.decoder.captures, batch.decoder.graphs
            rows.append(row)
    return rows


def attention_rows(heads: int, kv_heads: int, head_dim: int, start: int, steps: int) -> list[dict]:
    """A decode step's attention (one query per row, keys growing by one per step, a key
    mask with left padding) for `steps` new key lengths under each backend."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rep = heads // kv_heads
    backends = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "math": SDPBackend.MATH}
    rows = []
    for batch in (1, 8, 32):
        q = torch.randn(batch, kv_heads, rep, head_dim, device=dev, dtype=dtype)
        kv = torch.randn(2, batch, kv_heads, start + steps + 64, head_dim, device=dev, dtype=dtype)
        valid = torch.ones(batch, start + steps + 64, dtype=torch.bool, device=dev)
        valid[1:, :7] = False  # left padding on all rows but the first
        for name, backend in backends.items():
            try:
                sync(dev)
                t = time.perf_counter()
                for s in range(start, start + steps):  # a new key length every call, as in decoding
                    with sdpa_kernel([backend]) if backend is not None else torch.no_grad():
                        F.scaled_dot_product_attention(q, kv[0, :, :, :s], kv[1, :, :, :s],
                                                       attn_mask=valid[:, None, None, :s])
                sync(dev)
                ms = 1000 * (time.perf_counter() - t) / steps
            except RuntimeError as exc:  # backend unavailable for these inputs
                rows.append({"what": "sdpa_decode", "batch": batch, "backend": name, "error": str(exc)[:120]})
                continue
            rows.append({"what": "sdpa_decode", "batch": batch, "backend": name, "ms_per_call": ms,
                         "device": str(dev)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF export folder (RUN/hf)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    args = p.parse_args()
    cfg = json.loads((Path(args.model) / "model_config.json").read_text())
    heads, kv_heads = cfg["n_heads"], cfg.get("n_kv_heads") or cfg["n_heads"]
    rows = attention_rows(heads, kv_heads, cfg["dim"] // heads, args.prompt_tokens, args.new_tokens)
    rows += engine_rows(args.model, args.prompt_tokens, args.new_tokens)
    for row in rows:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    print(f"\n{'what':<16}{'batch':>6}{'backend':>11}{'ms':>9}{'tok/s':>10}{'same tokens':>13}")
    for r in rows:
        ms = r.get("ms_per_call", r.get("step_ms"))
        print(f"{r['what']:<16}{r['batch']:>6}{r.get('backend', ''):>11}"
              f"{'error' if ms is None else f'{ms:.3f}':>9}{r.get('tokens_per_s', 0):>10.0f}"
              f"{next((f'{v:.3f}' for k, v in r.items() if k.startswith('same_tokens')), ''):>13}")


if __name__ == "__main__":
    main()
