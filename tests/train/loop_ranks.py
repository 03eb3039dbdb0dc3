"""Run by tests/train/test_loop.py under torchrun (2 processes, gloo, ZeRO-2): each rank
trains one step whose micro-batches count very different numbers of targets, and
checks that the step's gradient is that of (all summed losses) / (global count)."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from train.config import StageConfig  # noqa: E402
from train.distributed import setup  # noqa: E402
from train.loop import build_engine, train_step  # noqa: E402
from train.losses import IGNORE_INDEX  # noqa: E402
from train.model import Transformer  # noqa: E402
from train.model_config import ModelConfig  # noqa: E402

MCFG = ModelConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, max_seq_len=32)
# targets per (rank, micro-batch): one rank's micro-batch counts 1, another 60
KEEP = {(0, 0): 1, (0, 1): 60, (1, 0): 25, (1, 1): 7}


def batch(rank: int, micro: int) -> dict:
    g = torch.Generator().manual_seed(100 * rank + micro)
    x = torch.randint(0, 64, (4, 16), generator=g)
    y = torch.randint(0, 64, (4, 16), generator=g).reshape(-1)
    y[KEEP[(rank, micro)]:] = IGNORE_INDEX
    y = y.reshape(4, 16)
    return {"x": x, "y": y, "count": int((y != IGNORE_INDEX).sum()), "tokens": x.numel()}


class Task:
    name = "test"

    def __init__(self, rank: int):
        self.rank = rank

    def micro_batch(self, step: int, micro: int) -> dict:
        return batch(self.rank, micro)

    def loss(self, engine, b: dict):
        _, summed = engine(b["x"], b["y"], reduction="sum")
        return summed, b["count"], {}


def main() -> None:
    ctx = setup(False)
    cfg = StageConfig.model_validate({"output": "/tmp/unused", "data": {"micro_batch_size": 4, "grad_accum": 2},
                                      "deepspeed": {"zero_stage": 2, "precision": "fp32"}, "optim": {"grad_clip": 1e9}})
    torch.manual_seed(0)
    model = Transformer(MCFG)
    reference = Transformer(MCFG)
    reference.load_state_dict(model.state_dict())
    engine, _, _ = build_engine(cfg, model, ctx, total_steps=10)
    stats = train_step(engine, Task(ctx.rank), 0, 2, ctx)
    ours = float(engine.get_global_grad_norm())
    # reference: every rank's micro-batches in one process, summed, over the total count
    total = sum(batch(r, m)["count"] for r in range(2) for m in range(2))
    loss = sum(reference(batch(r, m)["x"], batch(r, m)["y"], reduction="sum")[1] for r in range(2) for m in range(2))
    (loss / total).backward()
    ref = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in reference.parameters())).item()
    mean_of_means = sum(reference(batch(r, m)["x"], batch(r, m)["y"])[1] for r in range(2) for m in range(2)) / 4
    reference.zero_grad()
    mean_of_means.backward()
    wrong = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in reference.parameters())).item()
    print(f"rank {ctx.rank}: ours {ours:.6f} ref {ref:.6f} mean-of-means {wrong:.6f} count {stats.count}", flush=True)
    ok = abs(ours - ref) < 1e-5 * ref and abs(wrong - ref) > 1e-2 * ref
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
