"""`zerolm train pretrain`: next-token pretraining on packed tokens.

`prepare` checks everything a user can get wrong before any worker starts (data,
model, vocabulary, the run folder's history); `PretrainTask` is what the shared loop
needs for pretraining; `worker` is the per-rank entry point Ray Train (or a plain
process) runs.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dataproc.tokenizer import token_byte_lengths
from train.config import TrainConfig
from train.data import PackedSplit, WindowSampler, eval_windows, read_manifest, tokenizer_dir_of
from train.distributed import WorkerContext, all_reduce_sum
from train.model import Transformer
from train.model_config import ModelConfig, from_preset
from zerolm.config import config_hash
from zerolm.errors import UserError
from zerolm.stage import OWNER, StageDir, write_json_atomic

STAGE = "pretrain"
# Keys that do not change what is trained: a run may resume with other values.
NOT_HASHED = {"scaling": {"launcher", "address", "max_failures", "cpus_per_worker"},
              "checkpoint": True, "log_every": True, "threads_per_worker": True, "eval": {"every"}}


def model_config_for(cfg: TrainConfig, manifest: dict) -> ModelConfig:
    overrides = dict(cfg.model.overrides)
    vocab = int(manifest["vocab_size"])
    if overrides.get("vocab_size", vocab) != vocab:
        raise UserError(f"model.overrides.vocab_size={overrides['vocab_size']} but the tokens were packed with a "
                        f"vocabulary of {vocab}")
    overrides["vocab_size"] = vocab
    mcfg = from_preset(cfg.model.preset, **overrides)
    if cfg.data.seq_len > mcfg.max_seq_len:
        raise UserError(f"data.seq_len={cfg.data.seq_len} is longer than the model's max_seq_len="
                        f"{mcfg.max_seq_len} (set model.overrides.max_seq_len)")
    return mcfg


def run_hash(cfg: TrainConfig, manifest: dict) -> str:
    data = cfg.model_dump(mode="json", exclude=NOT_HASHED)
    data.pop("output", None)
    return config_hash({"config": data, "tokenizer": manifest["tokenizer"]["sha256"],
                        "tokens": manifest.get("clean", {}).get("config_hash")})


def prepare(cfg: TrainConfig, *, overwrite: bool = False) -> tuple[ModelConfig, dict, StageDir, bool]:
    """Validate; set up RUN_DIR. Returns (model config, manifest, stage, should_run)."""
    if not cfg.output:
        raise UserError("no run folder: give --output RUN_DIR")
    if not cfg.data.tokens:
        raise UserError("no training data: give --data TOKENS_DIR")
    manifest = read_manifest(cfg.data.tokens)
    mcfg = model_config_for(cfg, manifest)
    if not manifest["splits"]["train"]:
        raise UserError(f"{cfg.data.tokens} has no training tokens")
    WindowSampler(PackedSplit(cfg.data.tokens, "train"), cfg.data.seq_len, mixture=cfg.data.mixture or None,
                  total_samples=cfg.total_steps(cfg.scaling.num_workers) * cfg.data.micro_batch_size *
                  cfg.data.grad_accum * cfg.scaling.num_workers)  # mixture errors surface here
    tokenizer_dir_of(cfg.data.tokens, manifest)  # the tokenizer must still be there
    run_dir = Path(cfg.output)
    stage = StageDir(run_dir, STAGE, run_hash(cfg, manifest))
    if stage.is_done() and not overwrite:
        return mcfg, manifest, stage, False
    started = _owner_hash(run_dir)
    if started == stage.config_hash and not overwrite:
        return mcfg, manifest, stage, True  # same run interrupted: resume from its checkpoints
    if started is not None and not overwrite:
        raise UserError(f"{run_dir} holds a run with another config; pass --overwrite or choose a new --output")
    stage.begin(overwrite=True if started is not None else overwrite)
    mcfg.save(run_dir)
    write_json_atomic(run_dir / "run.json", {
        "stage": STAGE, "config": cfg.model_dump(mode="json"), "config_hash": stage.config_hash,
        "tokens": {"path": str(Path(cfg.data.tokens).resolve()), "manifest_totals": manifest["totals"]},
        "tokenizer": manifest["tokenizer"], "clean": manifest.get("clean"), "model_params": mcfg.num_params(),
        "started": time.time()})
    return mcfg, manifest, stage, True


def _owner_hash(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / OWNER).read_text(encoding="utf-8")).get("config_hash")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class PretrainTask:
    name = STAGE

    def __init__(self, cfg: TrainConfig, mcfg: ModelConfig, manifest: dict, ctx: WorkerContext):
        self.cfg, self.mcfg, self.ctx = cfg, mcfg, ctx
        d = cfg.data
        mixture = d.mixture if d.mixture is not None else manifest.get("mixture") or None
        total_samples = cfg.total_steps(ctx.world_size) * d.micro_batch_size * d.grad_accum * ctx.world_size
        self.sampler = WindowSampler(PackedSplit(d.tokens, "train"), d.seq_len, seed=d.seed, rank=ctx.rank,
                                     world_size=ctx.world_size, mixture=mixture, total_samples=total_samples)
        self.val = PackedSplit(d.tokens, "val") if manifest["splits"]["val"] else None
        # bytes of text each token stands for: bits per byte compares across tokenizers
        self.tokenizer_dir = tokenizer_dir_of(d.tokens, manifest)
        self.token_bytes = torch.tensor(token_byte_lengths(self.tokenizer_dir), dtype=torch.float64)

    def build_model(self) -> torch.nn.Module:
        return Transformer(self.mcfg).to(self.ctx.device)

    def micro_batch(self, step: int, micro: int) -> dict:
        d = self.cfg.data
        k0 = (step * d.grad_accum + micro) * d.micro_batch_size
        w = torch.from_numpy(self.sampler.batch(k0, d.micro_batch_size)).to(self.ctx.device)  # (B, T+1)
        return {"x": w[:, :-1], "y": w[:, 1:]}

    def loss(self, engine, batch: dict):
        _, loss = engine(batch["x"], batch["y"])
        return loss, {}

    def tokens_per_micro_batch(self) -> int:
        return self.cfg.data.micro_batch_size * self.cfg.data.seq_len

    def flops_per_token(self) -> float:
        return self.mcfg.flops_per_token(self.cfg.data.seq_len)

    @torch.no_grad()
    def evaluate(self, engine) -> dict:
        """Loss and bits per UTF-8 byte on each source's val split (windows spread over
        ranks, sums all-reduced)."""
        if self.val is None:
            return {}
        engine.eval()
        out, totals = {}, [0.0, 0.0, 0.0]
        for name, src in sorted(self.val.sources.items()):
            nats = ntok = nbytes = 0.0
            for w in eval_windows(src, self.cfg.data.seq_len, self.cfg.eval.max_windows, self.ctx.rank,
                                  self.ctx.world_size):
                w = torch.from_numpy(w).to(self.ctx.device)[None]  # (1, T+1)
                logits = engine(w[:, :-1])  # (1, T, V)
                losses = F.cross_entropy(logits.float()[0], w[0, 1:], reduction="none")  # (T,)
                nats += losses.sum().item()
                ntok += losses.numel()
                nbytes += self.token_bytes[w[0, 1:].cpu()].sum().item()
            nats, ntok, nbytes = all_reduce_sum([nats, ntok, nbytes], self.ctx.device)
            if ntok:
                out[f"val/{name}/loss"] = nats / ntok
                out[f"val/{name}/bpb"] = nats / (math.log(2) * max(nbytes, 1))
                totals = [totals[0] + nats, totals[1] + ntok, totals[2] + nbytes]
        if totals[1]:
            out["val/loss"] = totals[0] / totals[1]
            out["val/bpb"] = totals[0] / (math.log(2) * max(totals[2], 1))
            per_source = [v for k, v in out.items() if k.endswith("/bpb") and k.count("/") == 2]
            out["val/mean_source_bpb"] = float(np.mean(per_source))
        engine.train()
        return out
