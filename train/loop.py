"""The one training loop: DeepSpeed engine, steps, logging, evaluation, checkpoints.

pretrain, sft, reward, dpo and ppo differ only in their `Task`: what model to build,
what a micro-batch is, what the loss is, what evaluation means. The loop runs the
same way under Ray Train (launch.py), torchrun, or one plain process (a GPU box
without Ray can benchmark `train_step` directly).
"""

from __future__ import annotations

import os
import time
from typing import Protocol

import torch

from train import checkpoint
from train.config import TrainConfig
from train.distributed import WorkerContext, all_reduce_sum
from train.metrics import MetricsLogger, detect_peak_tflops
from train.schedule import make_lambda, param_groups


class Task(Protocol):
    name: str

    def build_model(self) -> torch.nn.Module: ...

    def micro_batch(self, step: int, micro: int) -> dict: ...

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, dict]: ...

    def evaluate(self, engine) -> dict: ...

    def flops_per_token(self) -> float: ...

    def tokens_per_micro_batch(self) -> int: ...

    def export(self, state_dict: dict, out_dir) -> None: ...


def deepspeed_config(cfg: TrainConfig, world_size: int, use_gpu: bool) -> dict:
    ds = cfg.deepspeed
    stage, precision = ds.resolved_zero_stage(world_size), ds.resolved_precision(use_gpu)
    zero: dict = {"stage": stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_params:
        if stage != 3:
            raise ValueError("deepspeed.offload_params needs zero_stage 3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    conf = {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": cfg.data.grad_accum,
        "train_batch_size": cfg.data.micro_batch_size * cfg.data.grad_accum * world_size,
        "zero_optimization": zero,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": ds.initial_scale_power,
                 "loss_scale_window": ds.loss_scale_window},
        "torch_autocast": {"enabled": precision == "amp_bf16", "dtype": "bfloat16"},
        # We pass torch's AdamW (DeepSpeed's fused/CPU Adam need compiled ops); ZeRO
        # partitions it like its own, so allow it explicitly.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(conf, ds.extra)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_engine(cfg: TrainConfig, model: torch.nn.Module, ctx: WorkerContext, total_steps: int):
    """DeepSpeed engine around `model` with AdamW (decay on >= 2-D params only) and
    the schedule as a LambdaLR stepped by DeepSpeed at each optimizer step."""
    import deepspeed

    o = cfg.optim
    if cfg.compile:
        # In place: parameter names (checkpoints, export) stay as they are, and the
        # compiled graph is the plain model's, outside DeepSpeed's hooks.
        model.fused_loss = False  # inductor fuses the plain loss better than our chunks
        model.compile()
    fused = ctx.device.type == "cuda" and not cfg.deepspeed.offload_optimizer
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                  eps=o.eps, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, make_lambda(total_steps, o, cfg.schedule))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, ctx.world_size, ctx.device.type == "cuda"), dist_init_required=False)
    return engine, optimizer, scheduler


def train_step(engine, task: Task, step: int, grad_accum: int) -> float:
    """One optimizer step (grad_accum micro-steps); returns this rank's mean loss."""
    total = 0.0
    for micro in range(grad_accum):
        batch = task.micro_batch(step, micro)
        loss, _ = task.loss(engine, batch)
        engine.backward(loss)
        engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        total += loss.detach().float().item()
    return total / grad_accum


def _maybe_crash(step: int, ctx: WorkerContext) -> None:
    """Test hook: kill this worker process hard after `step` (once), to test resume."""
    at, marker = os.environ.get("ZEROLM_CRASH_AT_STEP"), os.environ.get("ZEROLM_CRASH_MARKER")
    if at and marker and int(at) == step and ctx.is_main and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(17)


def run_training(cfg: TrainConfig, task: Task, ctx: WorkerContext, run_dir, *, echo=print) -> dict:
    torch.manual_seed(cfg.data.seed + ctx.rank)
    total = cfg.total_steps(ctx.world_size)
    model = task.build_model()
    if cfg.activation_checkpointing:
        model.gradient_checkpointing = True
    engine, _, scheduler = build_engine(cfg, model, ctx, total)
    logger = MetricsLogger(run_dir, enabled=ctx.is_main)
    start = 0
    latest = checkpoint.latest_checkpoint(run_dir)
    if latest is not None:
        meta = checkpoint.load(engine, latest[1], ctx)
        start = meta["step"]
        if ctx.is_main:
            echo(f"resumed from {latest[1]} (step {start}, {meta['tokens_seen']} tokens seen)")
    tokens_per_step = task.tokens_per_micro_batch() * cfg.data.grad_accum * ctx.world_size
    peak = cfg.peak_tflops or detect_peak_tflops(ctx.device)
    flops_per_token = task.flops_per_token()

    def meta(step: int) -> dict:
        # The data position is the step: each rank's samples are a pure function of it.
        samples = step * cfg.data.micro_batch_size * cfg.data.grad_accum * ctx.world_size
        return {"step": step, "tokens_seen": step * tokens_per_step, "samples_seen": samples,
                "world_size": ctx.world_size, "total_steps": total}

    last_eval = {}
    window_start, window_steps, acc_loss = time.time(), 0, 0.0
    for step in range(start, total):
        acc_loss += train_step(engine, task, step, cfg.data.grad_accum)
        window_steps += 1
        done = step + 1
        if done % cfg.log_every == 0 or done == total:
            loss_sum, = all_reduce_sum([acc_loss], ctx.device)
            elapsed = time.time() - window_start
            tps = window_steps * tokens_per_step / max(elapsed, 1e-9)
            grad_norm = engine.get_global_grad_norm()
            row = {"loss": loss_sum / (ctx.world_size * window_steps), "lr": scheduler.get_last_lr()[0],
                   "grad_norm": float(grad_norm) if grad_norm is not None else None, "tokens_per_s": tps,
                   "tokens_seen": done * tokens_per_step,
                   "mfu": tps * flops_per_token / (peak * 1e12 * ctx.world_size) if peak else None}
            logger.log(done, row)
            if ctx.is_main:
                echo(f"step {done}/{total} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                     f"tok/s {tps:,.0f}" + (f" mfu {row['mfu']:.1%}" if row["mfu"] else ""))
            window_start, window_steps, acc_loss = time.time(), 0, 0.0
        if (cfg.eval.every and done % cfg.eval.every == 0) or done == total:
            last_eval = task.evaluate(engine)
            logger.log(done, last_eval, kind="eval")
            if ctx.is_main and last_eval:
                echo("eval " + " ".join(f"{k} {v:.4f}" for k, v in last_eval.items() if k.endswith("bpb")))
        if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == total:
            checkpoint.save(engine, run_dir, done, meta(done), ctx, cfg.checkpoint.keep_last)
        _maybe_crash(done, ctx)
    logger.close()
    return {"steps": total, "tokens_seen": total * tokens_per_step, "eval": last_eval, "engine": engine}
