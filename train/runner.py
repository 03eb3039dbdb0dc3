"""The stage runner: the one lifecycle of every training stage.

    plan (validate config and inputs, no output yet) -> hash -> resume or start
    -> launch (Ray Train TorchTrainer, or this process) -> export -> _SUCCESS

A stage (train/stages.py lists them) says only what is its own: its config model, CLI
flags, how to check and prepare its inputs (`plan`), and the `Task` the shared loop
trains. Everything else, from the run folder's protocol to the per-rank entry point,
lives here once.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from train import checkpoint
from train.config import StageConfig
from train.model_config import ModelConfig
from train.stages import get_stage
from zerolm.config import config_hash
from zerolm.errors import UserError
from zerolm.lineage import from_lineage
from zerolm.stage import OWNER, StageDir, write_json_atomic

# Keys that do not change what is trained: a run may resume with other values.
NOT_HASHED = {"output": True, "scaling": {"launcher", "address", "max_failures", "cpus_per_worker"},
              "checkpoint": True, "log_every": True, "threads_per_worker": True, "eval": {"every", "at_start"}}


@dataclass
class Plan:
    """What a stage found out before anything is written."""

    model_config: ModelConfig
    total_steps: int
    lineage: dict  # the inputs (paths and content hashes): part of the run hash, kept in run.json
    describe: str  # one line printed before training starts
    # Writes what the workers read (e.g. SFT's tokenized examples) into the run folder.
    # Called once the folder is ours; must give the same files for the same inputs.
    write: Callable[[Path], None] | None = None
    info: dict = field(default_factory=dict)  # more facts for run.json (data statistics)


class Stage:
    """Base of every stage. Subclasses set name/help/config and implement plan and task."""

    name: str
    help: str
    config: type[StageConfig]

    def add_arguments(self, parser) -> None:
        """Stage-specific CLI flags (--output, --resume and the common ones exist already)."""

    def cli_flags(self, args) -> dict:
        """The config keys those flags set."""
        return {}

    def absolute(self, cfg: StageConfig) -> StageConfig:
        """cfg with the stage's input paths absolute (workers run in other folders)."""
        return cfg

    def plan(self, cfg: StageConfig, echo=print) -> Plan:
        raise NotImplementedError

    def task(self, cfg: StageConfig, run_dir: Path, ctx):
        raise NotImplementedError

    summary_keys: tuple[str, ...] = ()  # the held-out metrics the CLI prints first; () = every top-level one
    next_step = ""  # what to do with the run, e.g. "zerolm serve --model chat={output}"

    def summary(self, cfg: StageConfig, result: dict) -> str:
        """What the CLI prints after a run (besides where the outputs are)."""
        ev = result.get("eval") or {}
        keys = self.summary_keys or [k for k in ev if k.count("/") <= 1]
        line = "final evaluation: " + ", ".join(f"{k} {ev.get(k, float('nan')):.4f}" for k in keys)
        return line + (f"; {self.next_step.format(output=cfg.output)}" if self.next_step else "")


class FineTuneStage(Stage):
    """A stage that starts from earlier weights (--init) and reads data files (--data):
    sft, reward, dpo. Its config has `init_from` and `data.paths`."""

    data_help = "data files: .json, .jsonl or .parquet files or globs (repeatable)"

    def add_arguments(self, parser) -> None:
        parser.add_argument("--init", help="the model to start from: a finished run folder or an HF folder")
        parser.add_argument("--data", nargs="+", action="extend", metavar="FILE_OR_GLOB", help=self.data_help)

    def cli_flags(self, args) -> dict:
        return {"init_from": args.init, "data": {"paths": args.data} if args.data else None}

    def absolute(self, cfg):
        return cfg.model_copy(update={"init_from": absolute(cfg.init_from), "data": cfg.data.model_copy(
            update={"paths": [absolute(p) for p in cfg.data.paths]})})

    @staticmethod
    def start_point(cfg):
        """The initial weights (checked) and their chat tokenizer; data.seq_len must fit
        the model's context."""
        from train.chat import ChatTokenizer
        from train.weights import resolve_init

        init = resolve_init(cfg.init_from)
        if cfg.data.seq_len > init.config.max_seq_len:
            raise UserError(f"data.seq_len={cfg.data.seq_len} is longer than the model's context "
                            f"({init.config.max_seq_len})")
        return init, ChatTokenizer(init.model_dir)

    @staticmethod
    def total_steps(cfg, n_rows: int) -> int:
        """max_steps, or `epochs` passes over n_rows rows, rounded up to whole steps."""
        d = cfg.data
        per_epoch = -(-n_rows // (d.micro_batch_size * d.grad_accum * cfg.scaling.num_workers))
        return cfg.max_steps or cfg.epochs * per_epoch


def absolute(path: str) -> str:
    return str(Path(path).resolve()) if path and "://" not in path else path


def run_hash(stage: Stage, cfg: StageConfig, plan: Plan) -> str:
    return config_hash({"stage": stage.name, "config": cfg.model_dump(mode="json", exclude=NOT_HASHED),
                        "inputs": plan.lineage})


def _owner_hash(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / OWNER).read_text(encoding="utf-8")).get("config_hash")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def check_resumable(run_dir: Path, num_workers: int, echo=print) -> None:
    """Before any worker starts: set broken checkpoints aside (checkpoint.set_aside_broken);
    a checkpoint holds one optimizer shard and one data position per rank, so refuse a
    different number of workers."""
    latest = checkpoint.set_aside_broken(run_dir, warn=echo)
    if latest is None:
        return
    meta = json.loads((latest[1] / "meta.json").read_text(encoding="utf-8"))
    if meta.get("world_size") != num_workers:
        raise UserError(f"{run_dir}: checkpoint {latest[1].name} was written by {meta.get('world_size')} workers, "
                        f"this run asks for {num_workers}; resume with scaling.num_workers={meta.get('world_size')} "
                        "(or start a new --output)")


def _refuse_other_config(run_dir: Path, cfg: StageConfig, stage: str) -> None:
    """The folder holds a run with another config. When only the number of workers
    differs, say so: its checkpoints hold that many optimizer shards and data positions."""
    try:
        run = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        before = type(cfg).model_validate(run["config"]) if run.get("stage") == stage else None
    except (OSError, ValueError, KeyError):  # pydantic's ValidationError is a ValueError
        before = None
    now = cfg.model_dump(mode="json", exclude=NOT_HASHED)
    if before is not None:
        workers = before.scaling.num_workers
        same = before.model_dump(mode="json", exclude=NOT_HASHED)
        same["scaling"]["num_workers"] = now["scaling"]["num_workers"]
        if same == now and workers != cfg.scaling.num_workers:
            raise UserError(f"{run_dir} was started with {workers} workers and this run asks for "
                            f"{cfg.scaling.num_workers}; resume it with scaling.num_workers={workers} (its "
                            "checkpoints hold one optimizer shard and data position per worker) or choose a new --output")
    raise UserError(f"{run_dir} holds a run with another config; pass --overwrite or choose a new --output")


def run_stage(name: str, cfg: StageConfig, *, overwrite: bool = False, echo=print) -> dict:
    """Driver side of `zerolm train NAME`: plan, claim or resume RUN_DIR, launch the
    workers, mark the run done. Returns result.json's contents."""
    from train.launch import launch

    stage = get_stage(name)
    if not cfg.output:
        raise UserError("no run folder: give --output RUN_DIR")
    cfg = stage.absolute(cfg.model_copy(update={"output": absolute(cfg.output)}))
    run_dir = Path(cfg.output)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--output {run_dir} exists and is not a folder")
    plan = stage.plan(cfg, echo)
    stage_dir = StageDir(run_dir, name, run_hash(stage, cfg, plan))
    if stage_dir.is_done() and not overwrite:
        echo(f"{run_dir} is already trained with this config (nothing to do)")
        return json.loads((run_dir / "result.json").read_text(encoding="utf-8"))
    started = _owner_hash(run_dir)
    if started == stage_dir.config_hash and not overwrite:
        check_resumable(run_dir, cfg.scaling.num_workers, echo)  # the same run, interrupted: resume
    elif started is not None and not overwrite:
        _refuse_other_config(run_dir, cfg, name)
    else:
        stage_dir.begin(overwrite=True if started is not None else overwrite)
        plan.model_config.save(run_dir)
        write_json_atomic(run_dir / "run.json", {
            "stage": name, "config": cfg.model_dump(mode="json"), "config_hash": stage_dir.config_hash,
            "inputs": plan.lineage, "model_params": plan.model_config.num_params(),
            "total_steps": plan.total_steps, **plan.info, "started": time.time()})
    if plan.write is not None:
        plan.write(run_dir)
    echo(plan.describe)
    launch(cfg, {"stage": name, "total_steps": plan.total_steps}, echo=echo)
    result = json.loads((run_dir / "result.json").read_text(encoding="utf-8"))
    stage_dir.finish(steps=result["steps"], tokens_seen=result["tokens_seen"], inputs=from_lineage(plan.lineage))
    return result


# --------------------------------------------------------------------------- per rank

def consolidated_state_dict(engine, run_dir: Path, zero_stage: int) -> dict:
    """Full fp32 weights of the final checkpoint (call on rank 0 after it is saved).
    ZeRO 1-3 keep fp32 master weights partitioned in the optimizer shards; DeepSpeed's
    zero_to_fp32 reassembles them from the checkpoint files, so no rank needs the
    whole optimizer in memory at once."""
    latest = checkpoint.latest_checkpoint(run_dir)
    if zero_stage > 0 and latest is not None:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with checkpoint.weights_only_loads():
            return get_fp32_state_dict_from_zero_checkpoint(str(latest[1].parent), tag=latest[1].name)
    return {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}


def worker(payload: dict[str, Any], echo=print) -> None:
    """What every rank runs (under Ray Train, torchrun or one process): rebuild the
    config from plain JSON, build the stage's task, run the shared loop, then rank 0
    exports RUN_DIR/hf/ from the final checkpoint."""
    from train.distributed import barrier, setup
    from train.loop import run_training

    stage = get_stage(payload["stage"])
    cfg = stage.config.model_validate(payload["config"])
    if cfg.threads_per_worker:
        torch.set_num_threads(cfg.threads_per_worker)
    ctx = setup(cfg.scaling.use_gpu)
    run_dir = Path(cfg.output)
    task = stage.task(cfg, run_dir, ctx)
    result = run_training(cfg, task, ctx, run_dir, int(payload["total_steps"]), echo=echo)
    if cfg.export_hf and ctx.is_main:
        state = consolidated_state_dict(result["engine"], run_dir, cfg.deepspeed.resolved_zero_stage(ctx.world_size))
        task.export(state, run_dir / "hf")
    if ctx.is_main:
        write_json_atomic(run_dir / "result.json", {"steps": result["steps"], "tokens_seen": result["tokens_seen"],
                                                    "eval": result["eval"], "finished": time.time()})
    barrier()


def write_prepared(run_dir: Path, tokenizer_src: Path, arrays: dict, *, stats: dict, rejects: list) -> None:
    """RUN_DIR/data/: what a stage prepared on the driver for its workers, written once
    the folder is ours. arrays: name -> object with save(path) and digest(); plus the
    tokenizer (copied: the workers and the export need it even if the source moves),
    stats.json and rejects.jsonl. Skipped when the same arrays are there (a resume)."""
    from dataproc.tokenizer import copy_tokenizer_files

    out = run_dir / "data"
    digest = {name: a.digest() for name, a in arrays.items()}
    if (out / "digest.json").is_file() and json.loads((out / "digest.json").read_text(encoding="utf-8")) == digest:
        return
    copy_tokenizer_files(tokenizer_src, out / "tokenizer")
    for name, a in arrays.items():
        a.save(out / f"{name}.npz")
    with open(out / "rejects.jsonl", "w", encoding="utf-8") as f:
        for r in rejects:
            f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
    write_json_atomic(out / "stats.json", stats)
    write_json_atomic(out / "digest.json", digest)
