#!/usr/bin/env python3
"""Serving throughput: `zerolm serve` (HTTP, concurrent clients, batched decoding)
against Hugging Face `generate` on the same HF export, same prompts and lengths.

For each concurrency c: c clients each send the same number of completion requests
(prompt of --prompt-tokens random-text tokens, exactly --new-tokens generated, greedy).
HF: `generate` on batches of c prompts (left padding), the best a single process does
with the library. Prints JSON lines and a table: generated tokens/s, p50/p99 latency.

    python3 bench/serve_throughput.py --make-model 25m --tokenizer TOKDIR --model /tmp/bench-model
    python3 bench/serve_throughput.py --model /tmp/bench-model --concurrency 1,8,32
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench runs from a checkout

import httpx  # noqa: E402
import torch  # noqa: E402


def make_model(preset: str, tokenizer: str, out: str) -> None:
    from dataproc.tokenizer import tokenizer_info
    from train.export_hf import export_hf
    from train.model import Transformer
    from train.model_config import from_preset

    info = tokenizer_info(tokenizer)
    torch.manual_seed(0)
    cfg = from_preset(preset, vocab_size=info.vocab_size)
    export_hf(Transformer(cfg), cfg, out, tokenizer_dir=tokenizer)
    print(f"wrote random-init {preset} ({cfg.num_params() / 1e6:.1f}M params) to {out}")


def prompts(model_dir: str, n: int, length: int) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    text = Path(__file__).read_text(encoding="utf-8") * 4  # any real text; this file will do
    ids = tok.encode(text).ids
    return [ids[i * 7: i * 7 + length] for i in range(n)]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def engine_stats(url: str) -> tuple[float, float, float, float]:
    """(batch size sum, steps, step seconds sum, steps) from the server's /metrics."""
    lines = httpx.get(url + "/metrics", timeout=30).text.splitlines()
    value = lambda name: float(next(ln.split()[-1] for ln in lines if ln.startswith(name + " ")))  # noqa: E731
    return (value("zerolm_batch_size_sum"), value("zerolm_batch_size_count"),
            value("zerolm_decode_step_seconds_sum"), value("zerolm_decode_step_seconds_count"))


def bench_server(model_dir: str, conc: int, reqs: int, plen: int, new: int, threads: int | None,
                 engine_thread: bool = False) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    proc = subprocess.Popen([sys.executable, "-m", "zerolm", "serve", "--model", f"m={model_dir}", "--port", str(port),
                             "--max-batch", "64"] + (["--engine-thread"] if engine_thread else []), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        ps = prompts(model_dir, conc * reqs, plen)
        body = lambda p: {"model": "m", "prompt": p, "max_tokens": new, "temperature": 0, "ignore_eos": True}  # noqa: E731
        lat: list[float] = []

        def client(k: int, n: int = reqs, record: bool = True) -> None:
            # One keep-alive connection per client, as load generators and SDK clients
            # do: a bare httpx.post builds a new client and TLS context every call, which
            # cost more CPU than the server itself on the 2-core VM.
            with httpx.Client(timeout=600) as http:
                for j in range(n):
                    t = time.time()
                    r = http.post(url + "/v1/completions", json=body(ps[k * reqs + j]))
                    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == new, r.text
                    if record:
                        lat.append(time.time() - t)

        # Warm up as HF is warmed up: one round of c concurrent requests (on a GPU the
        # server captures its CUDA graphs for the batch sizes and lengths it meets).
        with cf.ThreadPoolExecutor(conc) as pool:
            list(pool.map(lambda k: client(k, 1, False), range(conc)))
        before = engine_stats(url)
        t0 = time.time()
        with cf.ThreadPoolExecutor(conc) as pool:
            list(pool.map(client, range(conc)))
        wall = time.time() - t0
        after = engine_stats(url)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    d = [a - b for a, b in zip(after, before)]
    # mean sequences per decode step and mean step time: tell a batching problem (few
    # sequences per step) from a slow step
    return {"tokens_per_s": conc * reqs * new / wall, "p50_s": pct(lat, 0.5), "p99_s": pct(lat, 0.99),
            "mean_batch": d[0] / max(d[1], 1), "step_ms": 1000 * d[2] / max(d[3], 1)}


def bench_hf(model_dir: str, conc: int, reqs: int, plen: int, new: int) -> dict:
    from transformers import AutoModelForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
    model = model.to(dev).eval()
    ps = prompts(model_dir, conc * reqs, plen)
    pad = model.config.eos_token_id or 0

    def run(batch: list[list[int]]) -> None:
        n = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (n - len(p)) + p for p in batch], device=dev)
        mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in batch], device=dev)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=pad)
        assert out.shape[1] == n + new

    run(ps[:conc])  # warm up
    lat = []
    t0 = time.time()
    for j in range(reqs):  # each round: the c concurrent requests as one batch
        t = time.time()
        run(ps[j * conc:(j + 1) * conc])
        lat += [time.time() - t] * conc
    wall = time.time() - t0
    return {"tokens_per_s": conc * reqs * new / wall, "p50_s": pct(lat, 0.5), "p99_s": pct(lat, 0.99)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF export folder (RUN/hf)")
    p.add_argument("--make-model", metavar="PRESET", help="first write a random-init PRESET export to --model")
    p.add_argument("--tokenizer", help="tokenizer folder for --make-model")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests", type=int, default=2, help="requests per client")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch threads (server and HF)")
    p.add_argument("--engine-thread", action="store_true",
                   help="also measure the server with its engine on a thread of the HTTP process")
    args = p.parse_args()
    if args.make_model:
        make_model(args.make_model, args.tokenizer, args.model)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for conc in [int(c) for c in args.concurrency.split(",")]:
        runs = [("zerolm_serve", lambda: bench_server(args.model, conc, args.requests, args.prompt_tokens,
                                                       args.new_tokens, args.threads))]
        if args.engine_thread:
            runs.append(("zerolm_serve_engine_thread", lambda: bench_server(
                args.model, conc, args.requests, args.prompt_tokens, args.new_tokens, args.threads, True)))
        runs.append(("hf_generate", lambda: bench_hf(args.model, conc, args.requests, args.prompt_tokens,
                                                     args.new_tokens)))
        for what, fn in runs:
            row = {"what": what, "concurrency": conc, **{k: round(v, 3) for k, v in fn().items()},
                   "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads()}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\n{'server':<14}{'concurrency':>11}{'tok/s':>9}{'HF tok/s':>10}{'ratio':>7}{'p50 s':>8}{'p99 s':>8}"
          f"{'batch':>7}{'step ms':>9}")
    for conc in sorted({r["concurrency"] for r in rows}):
        hf = next(r for r in rows if r["concurrency"] == conc and r["what"] == "hf_generate")
        for ours in (r for r in rows if r["concurrency"] == conc and r["what"].startswith("zerolm")):
            mode = "engine thread" if ours["what"].endswith("thread") else "engine proc"
            print(f"{mode:<14}{conc:>11}{ours['tokens_per_s']:>9.1f}{hf['tokens_per_s']:>10.1f}"
                  f"{ours['tokens_per_s'] / hf['tokens_per_s']:>7.2f}{ours['p50_s']:>8.2f}{ours['p99_s']:>8.2f}"
                  f"{ours['mean_batch']:>7.1f}{ours['step_ms']:>9.2f}")


if __name__ == "__main__":
    main()
