#!/usr/bin/env python3
"""Training-step throughput: zerolm's step (our model in a DeepSpeed engine, the
exact `train.loop.train_step` the trainer runs) against Hugging Face LlamaForCausalLM
with the same shapes, in one process on one device. Runs without Ray.

Prints one JSON line per measurement, then a table with tokens/s, MFU and the ratio
to the first anchor row. GPU (bf16; the anchor uses autocast + fused AdamW as in
../shared/bench/gpu_anchor.py):

    python3 bench/train_step.py --device cuda --preset 125m --batch 32 --seq 1024 \
        --modes ours_eager,ours_compile,hf_eager,hf_compile

CPU (fp32, tiny preset): python3 bench/train_step.py --device cpu --preset tiny --batch 8 --seq 256
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench is run from a checkout, not installed

import torch  # noqa: E402

from train.config import StageConfig  # noqa: E402
from train.distributed import setup  # noqa: E402
from train.loop import build_engine, train_step  # noqa: E402
from train.model import Transformer  # noqa: E402
from train.model_config import from_preset  # noqa: E402


class RandomTokens:
    """The smallest Task: random token windows, next-token loss."""

    def __init__(self, mcfg, batch: int, seq: int, device):
        self.mcfg, self.batch, self.seq, self.device = mcfg, batch, seq, device
        g = torch.Generator().manual_seed(0)
        self.data = torch.randint(0, mcfg.vocab_size, (batch, seq + 1), generator=g).to(device)

    name = "random-tokens"

    def micro_batch(self, step: int, micro: int) -> dict:
        n = self.batch * self.seq
        return {"x": self.data[:, :-1], "y": self.data[:, 1:], "count": n, "tokens": n}

    def loss(self, engine, batch):
        return engine(batch["x"], batch["y"], reduction="sum")[1], batch["count"], {}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(step, device, warmup: int, steps: int) -> tuple[float, float]:
    t0 = time.time()
    for _ in range(warmup):
        step()
    sync(device)
    warm = time.time() - t0
    times = []
    for _ in range(steps):
        t = time.time()
        step()
        sync(device)
        times.append(time.time() - t)
    times.sort()
    return times[len(times) // 2], warm


def bench_ours(args, mcfg, ctx, compiled: bool, zero: int, amp: bool = False) -> tuple[float, float]:
    precision = ("amp_bf16" if amp else "bf16") if args.device == "cuda" else "fp32"
    cfg = StageConfig.model_validate({
        "output": "/tmp/unused", "max_steps": 10**6, "compile": compiled,
        "data": {"seq_len": args.seq, "micro_batch_size": args.batch},
        "deepspeed": {"zero_stage": zero, "precision": precision}})
    torch.manual_seed(0)
    model = Transformer(mcfg).to(ctx.device)
    engine, _, _ = build_engine(cfg, model, ctx, total_steps=10**6)
    task = RandomTokens(mcfg, args.batch, args.seq, ctx.device)
    return time_fn(lambda: train_step(engine, task, 0, 1, ctx), ctx.device, args.warmup, args.steps)


def bench_hf(args, mcfg, device, compiled: bool) -> tuple[float, float]:
    from transformers import LlamaConfig, LlamaForCausalLM

    hcfg = LlamaConfig(vocab_size=mcfg.vocab_size, hidden_size=mcfg.dim, intermediate_size=mcfg.ffn_dim,
                       num_hidden_layers=mcfg.n_layers, num_attention_heads=mcfg.n_heads,
                       num_key_value_heads=mcfg.kv_heads, max_position_embeddings=args.seq,
                       tie_word_embeddings=mcfg.tie_embeddings, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(hcfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type == "cuda" or None)
    fwd = torch.compile(model) if compiled else model
    x = torch.randint(0, mcfg.vocab_size, (args.batch, args.seq), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = fwd(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return time_fn(step, device, args.warmup, args.steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="125m")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--modes", default="hf_eager,ours_eager",
                   help="comma list of ours_eager, ours_compile, hf_eager, hf_compile; ours_*@zN sets the ZeRO "
                        "stage, a +amp suffix uses precision amp_bf16 (fp32 params, bf16 autocast)")
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU; default: measured bf16 matmul peak")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = setup(use_gpu=args.device == "cuda")
    mcfg = from_preset(args.preset, vocab_size=args.vocab, max_seq_len=max(args.seq, 8))
    peak = args.peak_tflops
    if peak is None and args.device == "cuda":
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ a
        sync(ctx.device)
        t = time.time()
        for _ in range(10):
            a @ a
        sync(ctx.device)
        peak = 2 * 8192**3 * 10 / (time.time() - t) / 1e12
        del a
    fpt = mcfg.flops_per_token(args.seq)
    rows = []
    for mode in args.modes.split(","):
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        # "ours_compile@z0": ZeRO stage after the @ (default --zero); "+amp": amp_bf16
        base, amp = mode.removesuffix("+amp"), mode.endswith("+amp")
        name, _, zero = base.partition("@z")
        compiled = name.endswith("compile")
        med, warm = (bench_ours(args, mcfg, ctx, compiled, int(zero or args.zero), amp) if name.startswith("ours")
                     else bench_hf(args, mcfg, ctx.device, compiled))
        tps = args.batch * args.seq / med
        row = {"what": mode, "device": torch.cuda.get_device_name() if ctx.device.type == "cuda" else "cpu",
               "preset": args.preset, "params_M": round(mcfg.num_params() / 1e6, 1), "batch": args.batch,
               "seq": args.seq, "tokens_per_s": round(tps), "step_s": round(med, 4), "warmup_s": round(warm, 1),
               "mfu": round(tps * fpt / (peak * 1e12), 3) if peak else None,
               "peak_mem_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 1) if ctx.device.type == "cuda" else None,
               "torch": torch.__version__, "threads": torch.get_num_threads()}
        print(json.dumps(row), flush=True)
        rows.append(row)
    base = next((r for r in rows if r["what"].startswith("hf")), rows[0])
    print(f"\n{'mode':<14}{'tok/s':>10}{'MFU':>7}{'vs ' + base['what']:>18}")
    for r in rows:
        mfu = f"{r['mfu']:.2f}" if r["mfu"] is not None else "-"
        print(f"{r['what']:<14}{r['tokens_per_s']:>10}{mfu:>7}{r['tokens_per_s'] / base['tokens_per_s']:>17.2f}x")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
