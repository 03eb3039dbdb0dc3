"""`zerolm train pretrain`: next-token pretraining on packed tokens.

`PretrainStage.plan` checks everything a user can get wrong before any worker starts
(data, model, vocabulary, mixture); `PretrainTask` is what the shared loop needs for
pretraining. The lifecycle around them is the stage runner's (train/runner.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dataproc.tokenizer import token_byte_lengths
from train.config import PretrainConfig
from train.data import PackedSplit, WindowSampler, eval_windows, read_manifest, tokenizer_dir_of
from train.distributed import WorkerContext, all_reduce_sum
from train.export_hf import export_hf
from train.model import Transformer
from train.model_config import ModelConfig, from_preset
from train.runner import Plan, Stage, absolute
from zerolm.errors import UserError


def model_config_for(cfg: PretrainConfig, manifest: dict) -> ModelConfig:
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


class PretrainStage(Stage):
    name = "pretrain"
    help = "pretrain a model on packed tokens"
    config = PretrainConfig

    def add_arguments(self, parser) -> None:
        parser.add_argument("--data", help="token folder (output of `zerolm pack`)")
        parser.add_argument("--preset", help="model preset: tiny, 25m, 125m, 350m")

    def cli_flags(self, args) -> dict:
        return {"data": {"tokens": args.data} if args.data else None,
                "model": {"preset": args.preset} if args.preset else None}

    def absolute(self, cfg: PretrainConfig) -> PretrainConfig:
        return cfg.model_copy(update={"data": cfg.data.model_copy(update={"tokens": absolute(cfg.data.tokens)})})

    def plan(self, cfg: PretrainConfig, echo=print) -> Plan:
        if not cfg.data.tokens:
            raise UserError("no training data: give --data TOKENS_DIR")
        manifest = read_manifest(cfg.data.tokens)
        mcfg = model_config_for(cfg, manifest)
        if not manifest["splits"]["train"]:
            raise UserError(f"{cfg.data.tokens} has no training tokens")
        workers = cfg.scaling.num_workers
        total = cfg.total_steps(workers)
        WindowSampler(PackedSplit(cfg.data.tokens, "train"), cfg.data.seq_len, mixture=cfg.data.mixture or None,
                      total_samples=total * cfg.data.micro_batch_size * cfg.data.grad_accum * workers)  # mixture errors
        tokenizer_dir_of(cfg.data.tokens, manifest)  # the tokenizer must still be there
        lineage = {"tokens": {"path": cfg.data.tokens, "manifest_totals": manifest["totals"],
                              "clean_config_hash": manifest.get("clean", {}).get("config_hash")},
                   "tokenizer": manifest["tokenizer"]}
        return Plan(model_config=mcfg, total_steps=total, lineage=lineage, info={"clean": manifest.get("clean")},
                    describe=f"model: {cfg.model.preset} {mcfg.num_params() / 1e6:.2f}M params; "
                             f"{total} steps of {cfg.tokens_per_step(workers)} tokens")

    def task(self, cfg: PretrainConfig, run_dir: Path, ctx: WorkerContext) -> "PretrainTask":
        return PretrainTask(cfg, ModelConfig.load(run_dir), read_manifest(cfg.data.tokens), ctx)


STAGE = PretrainStage()


class PretrainTask:
    name = "pretrain"

    def __init__(self, cfg: PretrainConfig, mcfg: ModelConfig, manifest: dict, ctx: WorkerContext):
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

    def frozen_models(self) -> dict:
        return {}

    def micro_batch(self, step: int, micro: int) -> dict:
        d = self.cfg.data
        k0 = (step * d.grad_accum + micro) * d.micro_batch_size
        w = torch.from_numpy(self.sampler.batch(k0, d.micro_batch_size)).to(self.ctx.device)  # (B, T+1)
        n = w.shape[0] * (w.shape[1] - 1)  # every position has a target
        return {"x": w[:, :-1], "y": w[:, 1:], "count": n, "tokens": n}

    def loss(self, engine, batch: dict):
        _, summed = engine(batch["x"], batch["y"], reduction="sum")
        return summed, batch["count"], {}

    def flops_per_token(self) -> float:
        return self.mcfg.flops_per_token(self.cfg.data.seq_len)

    def export(self, state_dict: dict, out_dir: Path) -> None:
        export_hf(state_dict, self.mcfg, out_dir, tokenizer_dir=self.tokenizer_dir)

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
