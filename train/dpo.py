"""`zerolm train dpo`: direct preference optimisation and its variants.

    zerolm train dpo --init SFT_RUN --data PAIRS... --output RUN_DIR [--set dpo.loss=ipo]

The policy starts from `--init`; a frozen reference is built from the same weights and
never updated (or, with `dpo.precompute_ref`, scores every pair once before training
and is then released: one model in memory and one forward per step). Sequence
log-probabilities are sums over the final answer's tokens, its <|im_end|> included.
Losses (`dpo.loss`, train/losses.py): sigmoid (DPO), cdpo (label-smoothed), robust
(rDPO), ipo, simpo (no reference). Metrics on training micro-batches and held-out pairs:
reward_accuracy, margin, rewards/chosen, rewards/rejected (beta x log ratio),
logp_accuracy (the policy's own per-token log-prob ranks the chosen answer first), and on
held-out pairs `val/kl_chosen`: the per-token KL(policy || reference) along the chosen
answers (not with precomputed log-probs, which release the reference).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from train.config import EvalSection, OptimSection, StageConfig
from train.distributed import WorkerContext
from train.export_hf import export_hf
from train.losses import DPO_LOSSES, IGNORE_INDEX, dpo_loss, sequence_sums
from train.loop import frozen_autocast
from train.pairs import PairsSection
from train.reward import PairStage, PairTask
from train.weights import find_model_dir, load_transformer
from zerolm.config import StrictModel

REF_CACHE = "ref_logps_{}.npy"  # RUN_DIR/data: precomputed reference log-probs of a split, (2 * pairs,)


class DPOSection(StrictModel):
    loss: Literal[DPO_LOSSES] = "sigmoid"  # type: ignore[valid-type]
    beta: float = Field(default=0.1, gt=0)  # the notes: 0.1-0.5
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)  # cdpo, robust, simpo
    simpo_gamma: float = Field(default=0.5, ge=0)
    precompute_ref: bool = False  # reference log-probs once, before training

    @model_validator(mode="after")
    def _smoothing(self):
        if self.label_smoothing and self.loss in ("sigmoid", "ipo"):
            raise ValueError(f"dpo.label_smoothing has no effect with dpo.loss={self.loss}; use cdpo or robust")
        return self


class DPOConfig(StageConfig):
    init_from: str = ""
    data: PairsSection = Field(default_factory=PairsSection)
    dpo: DPOSection = Field(default_factory=DPOSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    optim: OptimSection = Field(default_factory=lambda: OptimSection(lr=5e-7, weight_decay=0.0))
    epochs: int = Field(default=1, ge=1)


class DPOTask(PairTask):
    name = "dpo"
    shift = True

    def __init__(self, cfg: DPOConfig, run_dir: Path, ctx: WorkerContext):
        super().__init__(cfg, run_dir, ctx)
        self.run_dir = run_dir
        self.reference = None
        self.ref_tables: dict[str, np.ndarray] = {}  # precomputed, per split: (2 * pairs,) fp32
        if cfg.dpo.loss != "simpo":
            self.reference = load_transformer(find_model_dir(cfg.init_from), self.mcfg, device=ctx.device)
            if cfg.dpo.precompute_ref:
                self.ref_tables = {"train": self._precompute("train", self.train, self.sampler.rows),
                                   "val": self._precompute("val", self.val, self.val_rows)}
                self.reference = None  # released: the tables replace it

    @classmethod
    def in_memory(cls, cfg: DPOConfig, ctx: WorkerContext, mcfg, tokenizer_dir: Path, train, val,
                  reference: torch.nn.Module) -> "DPOTask":
        """The task over pairs already in memory, with a given reference (benchmarks)."""
        task = cls.__new__(cls)
        task.setup(cfg, ctx, mcfg, tokenizer_dir, train, val)
        task.run_dir, task.reference, task.ref_tables = None, reference, {}
        return task

    def build_model(self) -> torch.nn.Module:
        return load_transformer(find_model_dir(self.cfg.init_from), self.mcfg, device=self.ctx.device).train()

    def frozen_models(self) -> dict:
        return {"reference": self.reference} if self.reference is not None else {}

    # ------------------------------------------------------------------ log-probs
    @staticmethod
    def logps(model, b: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed answer log-probs and answer token counts per sequence of the batch (n,)."""
        _, per_token = model(b["x"], b["y"], positions=b["positions"], doc_ids=b["doc_ids"], reduction="none")
        n = len(b["seqs"])
        counted = (b["y"] != IGNORE_INDEX).float()
        return sequence_sums(-per_token, b["example_ids"], n), sequence_sums(counted, b["example_ids"], n)

    def batch(self, data, rows: list[list[int]]) -> dict:
        b = super().batch(data, rows)
        b["split"] = "train" if data is self.train else "val"
        return b

    @torch.no_grad()
    def _precompute(self, split: str, data, all_rows: list[list[int]]) -> np.ndarray:
        """Reference log-probs of every sequence of a split, rows split over ranks and
        summed; cached in RUN_DIR/data so a resumed run does not recompute them."""
        cache = self.run_dir / "data" / REF_CACHE.format(split)
        n = 2 * len(data)
        if cache.is_file():
            table = np.load(cache, allow_pickle=False)
            if table.shape == (n,):
                return table
        table = torch.zeros(n, dtype=torch.float64, device=self.ctx.device)
        rows = all_rows[self.ctx.rank::self.ctx.world_size]
        for i in range(0, len(rows), self.cfg.data.micro_batch_size):
            b = self.batch(data, rows[i:i + self.cfg.data.micro_batch_size])
            with frozen_autocast(self.cfg, self.ctx.device):
                lp, _ = self.logps(self.reference, b)
            table[b["seqs"]] = lp.double()
        if torch.distributed.is_initialized() and self.ctx.world_size > 1:
            torch.distributed.all_reduce(table)
        out = table.float().cpu().numpy()
        if self.ctx.is_main:
            np.save(cache.with_suffix(".tmp.npy"), out)
            cache.with_suffix(".tmp.npy").replace(cache)
        return out

    def pair_losses(self, engine, b: dict, evaluation: bool = False):
        d = self.cfg.dpo
        lp, tokens = self.logps(engine, b)
        if d.loss == "simpo":
            ref = None
        elif self.ref_tables:
            ref = torch.from_numpy(self.ref_tables[b["split"]]).to(lp.device)[b["seqs"]]
        else:
            with torch.no_grad(), frozen_autocast(self.cfg, self.ctx.device):
                ref, _ = self.logps(self.reference, b)
        losses, r_c, r_r = dpo_loss(lp[0::2], lp[1::2], None if ref is None else ref[0::2],
                                    None if ref is None else ref[1::2], beta=d.beta, kind=d.loss,
                                    label_smoothing=d.label_smoothing, chosen_tokens=tokens[0::2],
                                    rejected_tokens=tokens[1::2], simpo_gamma=d.simpo_gamma)
        p = b["count"]
        with torch.no_grad():
            metrics = {"reward_accuracy": ((r_c > r_r).sum().item(), p), "margin": ((r_c - r_r).sum().item(), p),
                       "rewards/chosen": (r_c.sum().item(), p), "rewards/rejected": (r_r.sum().item(), p),
                       "logps/chosen": (lp[0::2].sum().item(), p), "logps/rejected": (lp[1::2].sum().item(), p),
                       # does the policy itself prefer the chosen answer (per-token log-prob)? before any
                       # update this is the SFT model's own ranking, where reward_accuracy is 0 (all ties)
                       "logp_accuracy": ((lp[0::2] / tokens[0::2].clamp(min=1) > lp[1::2] / tokens[1::2].clamp(min=1))
                                         .sum().item(), p)}
            if evaluation and self.reference is not None:  # (not with precomputed log-probs: no reference)
                metrics["kl_chosen"] = self._kl_chosen(engine, b)
        return losses.sum(), p, metrics

    def _kl_chosen(self, engine, b: dict) -> tuple[float, float]:
        """Sum over the chosen answers' positions of KL(policy || reference) of the
        next-token distributions, and the number of positions."""
        kw = {"positions": b["positions"], "doc_ids": b["doc_ids"]}
        logp = F.log_softmax(engine(b["x"], **kw).float(), dim=-1)  # (B, T, V)
        with frozen_autocast(self.cfg, self.ctx.device):
            logq = F.log_softmax(self.reference(b["x"], **kw).float(), dim=-1)
        chosen = (b["y"] != IGNORE_INDEX) & (b["example_ids"] % 2 == 0)  # sequences alternate chosen, rejected
        kl = (logp.exp() * (logp - logq)).sum(-1)  # (B, T)
        return kl[chosen].sum().item(), float(chosen.sum().item())

    def export(self, state_dict: dict, out_dir: Path) -> None:
        export_hf(state_dict, self.mcfg, out_dir, tokenizer_dir=self.tokenizer_dir, chat=True)


class DPOStage(PairStage):
    name = "dpo"
    help = "direct preference optimisation (DPO, cDPO, rDPO, IPO, SimPO) on preference pairs"
    config = DPOConfig
    summary_keys = ("val/reward_accuracy", "val/margin", "val/kl_chosen")
    next_step = "chat with it: zerolm serve --model chat={output}"

    def task(self, cfg: DPOConfig, run_dir: Path, ctx: WorkerContext) -> DPOTask:
        return DPOTask(cfg, run_dir, ctx)



STAGE = DPOStage()
