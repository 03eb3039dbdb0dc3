"""Learning-rate schedules as pure functions of the step, plus the optimizer's
parameter groups. Pure functions make resume trivial: the lr at step s depends on s
alone, never on scheduler state."""

from __future__ import annotations

import math

import torch

from train.config import OptimSection, ScheduleSection


def lr_at(step: int, total: int, peak: float, optim: OptimSection, sched: ScheduleSection) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`."""
    min_lr = peak * optim.min_lr_ratio
    warmup = int(sched.warmup_frac * total)
    if step < warmup:
        return peak * (step + 1) / warmup
    if sched.kind == "constant":
        return peak
    if sched.kind == "cosine":
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * progress))
    # warmup-stable-decay: flat at peak, then decay over the last decay_frac of steps
    decay_steps = max(1, int(sched.decay_frac * total))
    decay_start = max(warmup, total - decay_steps)
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
    if sched.decay_shape == "linear":
        frac = 1 - progress
    elif sched.decay_shape == "sqrt":
        frac = 1 - math.sqrt(progress)
    else:
        frac = 0.5 * (1 + math.cos(math.pi * progress))
    return min_lr + (peak - min_lr) * frac


def make_lambda(total: int, optim: OptimSection, sched: ScheduleSection):
    """For torch.optim.lr_scheduler.LambdaLR (multiplier of the peak lr)."""
    return lambda step: lr_at(step, total, 1.0, optim, sched)


def param_groups(model: torch.nn.Module, optim: OptimSection) -> list[dict]:
    """AdamW groups: weight decay on matrices (>= 2-D: linear and embedding weights),
    none on vectors (norm gains, biases), as in GPT-3 / Llama; the token tables of
    every decoder in `model` in groups of their own (no decay) when optim gives them
    their own lr (each group's "lr" is its peak: LambdaLR scales them all by the same
    schedule)."""
    from train.model import Transformer

    own_lr: dict[int, float] = {}
    for module in model.modules():
        if isinstance(module, Transformer):
            if optim.embedding_lr is not None:
                own_lr[id(module.tok_embeddings.weight)] = optim.embedding_lr
            if optim.lm_head_lr is not None:  # after the input table: a tied table takes this one
                own_lr[id(module.output.weight)] = optim.lm_head_lr
    decay, no_decay, tables = [], [], {}
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in own_lr:
            tables.setdefault(own_lr[id(p)], []).append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay, "lr": optim.lr},
              {"params": no_decay, "weight_decay": 0.0, "lr": optim.lr}]
    # No decay on tables with their own lr: AdamW decays every row at each step by lr x
    # weight_decay (3% at lr 0.3), while a rare token's row gets a gradient only in the
    # few steps that hold it (measured with wd 0, docs/benchmarks.md).
    groups += [{"params": ps, "weight_decay": 0.0, "lr": lr} for lr, ps in tables.items()]
    return [g for g in groups if g["params"]]
