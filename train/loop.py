"""The one training loop: DeepSpeed engine, steps, logging, evaluation, checkpoints.

pretrain, sft, reward, dpo and ppo differ only in their `Task`: what models to build
(one trained, any number frozen), what a micro-batch is, what the loss is, what
evaluation means. The stage runner (train/runner.py) owns everything around the
loop. The loop runs the same way under Ray Train (launch.py), torchrun, or one plain
process (a GPU box without Ray can benchmark `train_step` directly).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Protocol

import torch

from train import checkpoint
from train.config import StageConfig
from train.distributed import WorkerContext, all_gather_object, all_reduce_sum
from train.metrics import MetricsLogger, detect_peak_tflops
from train.schedule import make_lambda, param_groups


class Task(Protocol):
    """What a stage gives the loop. A micro-batch is a dict holding, besides its
    tensors, "count": the number of units its loss sums over (tokens that have a
    target, or pairs), known before any forward pass, and "tokens": the real (non-
    padding) tokens it feeds the model (throughput). `loss` returns the *summed* loss,
    that count, and metrics whose values are floats or (sum, n) pairs; the loop
    divides the loss by the count over all micro-batches and ranks of the step (a mean
    of per-micro-batch means would weight a short answer's tokens more than a long
    one's) and every metric by its own n."""

    name: str

    def build_model(self) -> torch.nn.Module: ...  # the trained model, on the device

    def frozen_models(self) -> dict[str, torch.nn.Module]: ...  # reference, reward, ...: never trained

    def micro_batch(self, step: int, micro: int) -> dict: ...

    # Optional: called with the engine before a step's micro-batches are taken, for
    # tasks whose data comes from the current weights (RL rollouts).
    # def begin_step(self, engine, step: int) -> None: ...

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, float, dict]: ...

    def evaluate(self, engine) -> dict: ...

    def flops_per_token(self) -> float: ...

    def export(self, state_dict: dict, out_dir: Path) -> None: ...


def deepspeed_config(cfg: StageConfig, world_size: int, use_gpu: bool) -> dict:
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


def build_engine(cfg: StageConfig, model: torch.nn.Module, ctx: WorkerContext, total_steps: int):
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
    optimizer = torch.optim.AdamW(param_groups(model, o), lr=o.lr, betas=(o.beta1, o.beta2),
                                  eps=o.eps, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, make_lambda(total_steps, o, cfg.schedule))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, ctx.world_size, ctx.device.type == "cuda"), dist_init_required=False)
    return engine, optimizer, scheduler


class StepStats:
    """Sums over micro-batches (and, once reduced, ranks) of what `train_step` saw."""

    def __init__(self):
        self.loss = self.count = self.tokens = 0.0
        self.metrics: dict[str, list[float]] = {}

    def add(self, loss: float, count: float, tokens: float, metrics: dict) -> None:
        self.loss, self.count, self.tokens = self.loss + loss, self.count + count, self.tokens + tokens
        for key, value in metrics.items():
            total, n = value if isinstance(value, tuple) else (value, 1.0)
            acc = self.metrics.setdefault(key, [0.0, 0.0])
            acc[0] += float(total)
            acc[1] += float(n)

    def merge(self, other: "StepStats") -> None:
        self.add(other.loss, other.count, other.tokens, {k: tuple(v) for k, v in other.metrics.items()})

    def reduced(self, device: torch.device) -> dict:
        """Means over every rank: loss per counted unit, each metric per its own n."""
        keys = sorted(set().union(*all_gather_object(sorted(self.metrics))))
        flat = [self.loss, self.count, self.tokens] + [x for k in keys for x in self.metrics.get(k, [0.0, 0.0])]
        flat = all_reduce_sum(flat, device)
        out = {"loss": flat[0] / max(flat[1], 1.0), "count": flat[1], "tokens": flat[2]}
        for i, key in enumerate(keys):
            total, n = flat[3 + 2 * i], flat[4 + 2 * i]
            out[key] = total / n if n else float("nan")
        return out


def train_step(engine, task: Task, step: int, grad_accum: int, ctx: WorkerContext) -> StepStats:
    """One optimizer step of grad_accum micro-batches. The loss that goes backward is
    summed_loss * world_size * grad_accum / global_count: DeepSpeed divides by
    grad_accum and averages gradients over ranks, so the step's gradient is that of
    (sum of every rank's summed losses) / (their total count)."""
    if hasattr(task, "begin_step"):
        task.begin_step(engine, step)
    batches = [task.micro_batch(step, micro) for micro in range(grad_accum)]
    global_count, = all_reduce_sum([float(sum(b["count"] for b in batches))], ctx.device)
    scale = ctx.world_size * grad_accum / max(global_count, 1.0)
    stats = StepStats()
    for batch in batches:
        summed, count, metrics = task.loss(engine, batch)
        if count != batch["count"]:
            raise RuntimeError(f"task {task.name}: loss counted {count} units, its micro-batch announced "
                               f"{batch['count']}")
        engine.backward(summed * scale)
        engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        stats.add(summed.detach().float().item(), count, batch.get("tokens", 0), metrics)
    return stats


def frozen_autocast(cfg: StageConfig, device: torch.device):
    """The context frozen models (references, reward models) run in. They run outside
    the DeepSpeed engine, whose autocast or half-precision weights do not reach them:
    in the precision the trained model computes in, policy and reference agree at the
    start (a KL of 0, DPO's loss log 2) instead of differing by rounding."""
    import contextlib

    precision = cfg.deepspeed.resolved_precision(device.type == "cuda")
    dtype = {"bf16": torch.bfloat16, "amp_bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype) if dtype else contextlib.nullcontext()


def prepare_frozen(task: Task, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The task's frozen models, in eval mode and without gradients; none may share a
    parameter with the trained model (it would then be trained, or checkpointed twice)."""
    frozen = task.frozen_models() if hasattr(task, "frozen_models") else {}
    trained = {id(p) for p in model.parameters()}
    for name, module in frozen.items():
        module.eval()
        module.requires_grad_(False)
        if any(id(p) in trained for p in module.parameters()):
            raise RuntimeError(f"task {task.name}: frozen model {name!r} shares parameters with the trained model")
    return frozen


def _maybe_crash(step: int, ctx: WorkerContext) -> None:
    """Test hook: after `step` (once), rank 0 kills its own process hard, to test resume,
    or with ZEROLM_CRASH_MODE=hold writes its Ray node id into the marker and waits for a
    test to remove that node (a multi-node failure)."""
    at, marker = os.environ.get("ZEROLM_CRASH_AT_STEP"), os.environ.get("ZEROLM_CRASH_MARKER")
    if not (at and marker and int(at) == step and ctx.is_main and not os.path.exists(marker)):
        return
    if os.environ.get("ZEROLM_CRASH_MODE") != "hold":
        open(marker, "w").close()
        os._exit(17)
    import ray

    Path(marker + ".tmp").write_text(ray.get_runtime_context().get_node_id())
    os.replace(marker + ".tmp", marker)
    while True:
        time.sleep(1)


def run_training(cfg: StageConfig, task: Task, ctx: WorkerContext, run_dir, total: int, *, echo=print) -> dict:
    """Train `task` for `total` optimizer steps, resuming from RUN_DIR's last checkpoint."""
    torch.manual_seed(cfg.data.seed + ctx.rank)
    model = task.build_model()
    prepare_frozen(task, model)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing = True
    engine, _, scheduler = build_engine(cfg, model, ctx, total)
    logger = MetricsLogger(run_dir, enabled=ctx.is_main)
    start, tokens_seen = 0, 0.0
    latest = checkpoint.latest_checkpoint(run_dir)
    if latest is not None:
        meta = checkpoint.load(engine, latest[1], ctx)
        start, tokens_seen = meta["step"], float(meta["tokens_seen"])
        if ctx.is_main:
            echo(f"resumed from {latest[1]} (step {start}, {meta['tokens_seen']:,.0f} tokens seen)")
    logger.begin(start)
    peak = cfg.peak_tflops or detect_peak_tflops(ctx.device)
    flops_per_token = task.flops_per_token()

    def meta(step: int) -> dict:
        # The data position is the step: each rank's samples are a pure function of it.
        samples = step * cfg.data.micro_batch_size * cfg.data.grad_accum * ctx.world_size
        unlogged, = all_reduce_sum([window.tokens], ctx.device)  # steps since the last log line
        return {"step": step, "tokens_seen": tokens_seen + unlogged, "samples_seen": samples,
                "world_size": ctx.world_size, "total_steps": total}

    last_eval = {}
    if cfg.eval.at_start and start == 0:
        first = task.evaluate(engine)
        logger.log(0, first, kind="eval")
        if ctx.is_main and first:
            echo("eval (initial weights) " + " ".join(f"{k} {v:.4f}" for k, v in first.items() if k.count("/") <= 1))
    window_start, window_steps, window = time.time(), 0, StepStats()
    for step in range(start, total):
        window.merge(train_step(engine, task, step, cfg.data.grad_accum, ctx))
        window_steps += 1
        done = step + 1
        if done % cfg.log_every == 0 or done == total:
            row = window.reduced(ctx.device)
            elapsed = time.time() - window_start
            tokens_seen += row["tokens"]
            tps = row.pop("tokens") / max(elapsed, 1e-9)
            grad_norm = engine.get_global_grad_norm()
            row.update({"lr": scheduler.get_last_lr()[0], "tokens_per_s": tps, "tokens_seen": tokens_seen,
                        "grad_norm": float(grad_norm) if grad_norm is not None else None,
                        "mfu": tps * flops_per_token / (peak * 1e12 * ctx.world_size) if peak else None})
            row["count"] /= window_steps  # units per optimizer step
            logger.log(done, row)
            if ctx.is_main:
                echo(f"step {done}/{total} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                     f"tok/s {tps:,.0f}" + (f" mfu {row['mfu']:.1%}" if row["mfu"] else ""))
            window_start, window_steps, window = time.time(), 0, StepStats()
        if (cfg.eval.every and done % cfg.eval.every == 0) or done == total:
            last_eval = task.evaluate(engine)
            logger.log(done, last_eval, kind="eval")
            if ctx.is_main and last_eval:
                echo("eval " + " ".join(f"{k} {v:.4f}" for k, v in last_eval.items() if k.count("/") <= 1))
        if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == total:
            checkpoint.save(engine, run_dir, done, meta(done), ctx, cfg.checkpoint.keep_last)
        _maybe_crash(done, ctx)
    logger.close()
    return {"steps": total, "tokens_seen": tokens_seen, "eval": last_eval, "engine": engine}
