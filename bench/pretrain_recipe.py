"""Pretraining recipes for the demo's CPU budget, scored against n-gram baselines.

A quick proxy of `zerolm train pretrain` for trying recipes (issue 17): the project's
own Transformer and AdamW groups (train/schedule.param_groups) in a plain torch loop,
one process, no DeepSpeed or Ray, random windows of a pack's train split. After
training it scores val documents of every source (each cut to the context, the
separator as its first input) with the model and with the unigram and Kneser-Ney
3-gram baselines of `zerolm eval --task bpb` (serve/eval/baselines.py) trained on the
same train split: identical tokens, so the bits per byte differ only in the model.
The recipe the demo ships is then checked by the real stage (`zerolm demo`), whose
numbers docs/benchmarks.md gives beside these.

    python3 bench/pretrain_recipe.py --tokens zerolm-demo/tokens --steps 480 \\
        --lr 5e-3 --embedding-lr 0.3 --lm-head-lr 0.03 --untied --bf16
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from common import emit
from serve.eval.baselines import NgramBaselines
from train.config import OptimSection, ScheduleSection
from train.model import Transformer
from train.model_config import from_preset
from train.schedule import lr_at, param_groups


def read_split(tokens: str, split: str, manifest: dict) -> dict[str, np.ndarray]:
    return {src: np.concatenate([np.fromfile(f"{tokens}/{sh['file']}", dtype=np.uint16) for sh in s["shards"]])
            .astype(np.int64) for src, s in manifest["splits"][split].items()}


def documents(stream: np.ndarray, separator: int) -> list[np.ndarray]:
    cuts = np.flatnonzero(stream == separator)
    bounds = zip(np.concatenate([[0], cuts + 1]), np.concatenate([cuts, [len(stream)]]))
    return [stream[a:b] for a, b in bounds if b > a]


def train(args, manifest: dict, stream: np.ndarray) -> tuple[Transformer, float, int]:
    torch.manual_seed(args.seed)
    cfg = from_preset(args.preset, vocab_size=manifest["vocab_size"], max_seq_len=args.seq_len,
                      tie_embeddings=not args.untied)
    model = Transformer(cfg)
    optim = OptimSection(lr=args.lr, embedding_lr=args.embedding_lr, lm_head_lr=args.lm_head_lr)
    sched = ScheduleSection()
    opt = torch.optim.AdamW(param_groups(model, optim), lr=args.lr, betas=(optim.beta1, optim.beta2))
    peaks = [g["lr"] for g in opt.param_groups]
    rng = np.random.default_rng(args.seed)
    start, t = time.time(), args.seq_len
    for step in range(args.steps):
        for group, peak in zip(opt.param_groups, peaks):
            group["lr"] = lr_at(step, args.steps, peak, optim, sched)
        rows = torch.from_numpy(np.stack([stream[i:i + t + 1]
                                          for i in rng.integers(0, len(stream) - t - 1, args.batch)]))
        with torch.autocast("cpu", torch.bfloat16, enabled=args.bf16):
            _, loss = model(rows[:, :-1], rows[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % max(1, args.steps // 6) == 0:
            print(f"step {step + 1} loss {loss.item():.3f}", flush=True)
    return model, time.time() - start, cfg.num_params()


@torch.no_grad()
def score(model: Transformer, val: dict, manifest: dict, baselines: NgramBaselines, args) -> dict:
    model.eval()
    sep, out = manifest["separator_id"], {}
    for src, stream in val.items():
        docs = [d[:args.seq_len] for d in documents(stream, sep) if len(d) >= 2][:args.val_docs]
        nats = 0.0
        for d in docs:
            x = torch.from_numpy(np.concatenate([[sep], d[:-1]]))[None]
            nats += torch.nn.functional.cross_entropy(model(x).float()[0], torch.from_numpy(d), reduction="sum").item()
        n_tokens = sum(len(d) for d in docs)
        split = manifest["splits"]["val"][src]
        bits_per_token = 1 / math.log(2) / n_tokens / (split["bytes"] / split["tokens"])
        base = baselines.nats([list(d) for d in docs])
        out[src] = {"model": round(nats * bits_per_token, 3), "unigram": round(base["unigram"] * bits_per_token, 3),
                    "kn3": round(base["kn3"] * bits_per_token, 3)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", required=True, help="a `zerolm pack` output")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--untied", action="store_true", help="separate input and output token tables")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16, help="rows per step (16 x 256 = the demo's 4,096 tokens)")
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--embedding-lr", type=float)
    p.add_argument("--lm-head-lr", type=float)
    p.add_argument("--bf16", action="store_true", help="torch.autocast to bf16 (as precision amp_bf16)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--val-docs", type=int, default=200, help="per source")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    manifest = json.load(open(f"{args.tokens}/manifest.json", encoding="utf-8"))
    train_split = read_split(args.tokens, "train", manifest)
    stream = np.concatenate(list(train_split.values()))
    model, seconds, params = train(args, manifest, stream)
    docs = documents(stream, manifest["separator_id"])
    doc_iter = iter(docs)
    baselines = NgramBaselines.train(lambda _: next(doc_iter), range(len(docs)), manifest["vocab_size"])
    bpb = score(model, read_split(args.tokens, "val", manifest), manifest, baselines, args)
    emit({"bench": "pretrain_recipe", **{k: v for k, v in vars(args).items() if k != "tokens"},
          "params": params, "train_s": round(seconds, 1),
          "tokens_per_s": round(args.steps * args.batch * args.seq_len / seconds), "bpb": bpb})
    print(f"\n{'source':<20} {'model':>7} {'unigram':>8} {'kn3':>7}")
    for src, row in bpb.items():
        print(f"{src:<20} {row['model']:>7.3f} {row['unigram']:>8.3f} {row['kn3']:>7.3f}")


if __name__ == "__main__":
    main()
