"""Per-rank entry of pretraining and the driver-side `run_pretrain`.

`worker` is what every rank runs (under Ray Train, torchrun or one process): build
the task, run the shared loop, then rank 0 consolidates the final checkpoint's fp32
weights and exports RUN_DIR/hf/ for transformers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from train import checkpoint
from train.config import TrainConfig
from train.distributed import barrier, setup
from train.export_hf import export_hf
from train.loop import run_training
from train.model_config import ModelConfig
from train.pretrain import PretrainTask, prepare
from zerolm.stage import write_json_atomic


def consolidated_state_dict(engine, run_dir: Path, zero_stage: int) -> dict:
    """Full fp32 weights of the final checkpoint (call on rank 0 after it is saved).
    ZeRO 1-3 keep fp32 master weights partitioned in the optimizer shards; DeepSpeed's
    zero_to_fp32 reassembles them from the checkpoint files, so no rank needs the
    whole optimizer in memory at once."""
    latest = checkpoint.latest_checkpoint(run_dir)
    if zero_stage > 0 and latest is not None:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(latest[1].parent), tag=latest[1].name)
    return {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}


def worker(payload: dict, echo=print) -> None:
    cfg = TrainConfig.model_validate(payload["config"])
    if cfg.threads_per_worker:
        torch.set_num_threads(cfg.threads_per_worker)
    ctx = setup(cfg.scaling.use_gpu)
    run_dir = Path(cfg.output)
    manifest = json.loads((Path(cfg.data.tokens) / "manifest.json").read_text(encoding="utf-8"))
    mcfg = ModelConfig.load(run_dir)
    task = PretrainTask(cfg, mcfg, manifest, ctx)
    result = run_training(cfg, task, ctx, run_dir, echo=echo)
    if cfg.export_hf and ctx.is_main:
        state = consolidated_state_dict(result["engine"], run_dir, cfg.deepspeed.resolved_zero_stage(ctx.world_size))
        export_hf(state, mcfg, run_dir / "hf", tokenizer_dir=task.tokenizer_dir)
    if ctx.is_main:
        write_json_atomic(run_dir / "result.json", {"steps": result["steps"], "tokens_seen": result["tokens_seen"],
                                                    "eval": result["eval"], "finished": time.time()})
    barrier()


def run_pretrain(cfg: TrainConfig, *, overwrite: bool = False, echo=print) -> dict:
    """Driver side: validate, launch the workers, mark the run done."""
    from train.launch import launch

    # Workers run elsewhere (another cwd, another node): give them absolute paths.
    cfg = cfg.model_copy(update={"output": _absolute(cfg.output),
                                 "data": cfg.data.model_copy(update={"tokens": _absolute(cfg.data.tokens)})})
    mcfg, manifest, stage, should_run = prepare(cfg, overwrite=overwrite)
    run_dir = Path(cfg.output)
    if not should_run:
        echo(f"{run_dir} is already trained with this config (nothing to do)")
        return json.loads((run_dir / "result.json").read_text(encoding="utf-8"))
    echo(f"model: {cfg.model.preset} {mcfg.num_params() / 1e6:.2f}M params; "
         f"{cfg.total_steps(cfg.scaling.num_workers)} steps of {cfg.tokens_per_step(cfg.scaling.num_workers)} tokens")
    launch(cfg, "pretrain", echo=echo)
    result = json.loads((run_dir / "result.json").read_text(encoding="utf-8"))
    stage.finish(steps=result["steps"], tokens_seen=result["tokens_seen"])
    return result


def _absolute(path: str) -> str:
    return str(Path(path).resolve()) if path and "://" not in path else path
