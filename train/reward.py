"""`zerolm train reward`: a reward model from preference pairs.

    zerolm train reward --init SFT_RUN --data PAIRS... --output RUN_DIR

The SFT model's decoder with a scalar `score` head on the last token of each
conversation (train/reward_model.py), trained with the pairwise loss
-log sigmoid(r_chosen - r_rejected - margin) (+ `reward.center` (r_c + r_r)^2).
Whole pairs are packed into rows (each conversation attends only to itself). Metrics:
accuracy, margin and mean chosen / rejected scores, on training micro-batches and on
the held-out pairs (`val/accuracy`, `val/margin`, `val/chosen`, `val/rejected`).
The export is a LlamaForSequenceClassification folder; `zerolm serve` serves it on
/v1/rewards.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

from train.chat import ChatTokenizer
from train.config import EvalSection, OptimSection, StageConfig
from train.distributed import WorkerContext, all_reduce_sum
from train.losses import reward_pair_loss
from train.model_config import ModelConfig
from train.packing import RowSampler, row_batch
from train.pairs import PairExamples, PairsSection, pair_rows, prepare_pairs
from train.reward_model import RewardModel, export_reward_model
from train.runner import FineTuneStage, Plan, write_prepared
from train.weights import find_model_dir, load_transformer
from zerolm.config import StrictModel

DATA = "data"


class RewardSection(StrictModel):
    center: float = Field(default=0.0, ge=0)  # coefficient of (r_c + r_r)^2; trl suggests 0.01


class RewardConfig(StageConfig):
    init_from: str = ""
    data: PairsSection = Field(default_factory=PairsSection)
    reward: RewardSection = Field(default_factory=RewardSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    optim: OptimSection = Field(default_factory=lambda: OptimSection(lr=1e-5, weight_decay=0.0))
    epochs: int = Field(default=1, ge=1)


def plan_pairs(stage: FineTuneStage, cfg, echo, *, shift: bool) -> Plan:
    """What the reward and DPO stages share: init, chat template, pairs, rows, steps."""
    init, chat = stage.start_point(cfg)
    data = prepare_pairs(cfg.data, chat, echo)
    rows = pair_rows(data.train, 2 * cfg.data.seq_len, seed=cfg.data.seed, shift=shift)
    d = cfg.data
    total = stage.total_steps(cfg, len(rows))
    lineage = {"init": init.lineage(), "data": data.files}

    def write(run_dir: Path) -> None:
        write_prepared(run_dir, init.model_dir, {"train": data.train, "val": data.val},
                       stats={**data.stats, "rows": len(rows)}, rejects=data.rejects)

    return Plan(model_config=init.config, total_steps=total, lineage=lineage, write=write,
                info={"data": {**data.stats, "rows": len(rows)}},
                describe=f"{stage.name} of {init.config.num_params() / 1e6:.2f}M params from {init.path}: "
                         f"{len(data.train)} pairs in {len(rows)} rows of {2 * d.seq_len}, {total} steps")


class PairTask:
    """Reward and DPO tasks: held pairs, packed rows, one sampler."""

    shift = True

    def __init__(self, cfg, run_dir: Path, ctx: WorkerContext):
        self.setup(cfg, ctx, ModelConfig.load(run_dir), run_dir / DATA / "tokenizer",
                   PairExamples.load(run_dir / DATA / "train.npz"), PairExamples.load(run_dir / DATA / "val.npz"))

    def setup(self, cfg, ctx: WorkerContext, mcfg: ModelConfig, tokenizer_dir: Path, train: PairExamples,
              val: PairExamples) -> None:
        self.cfg, self.ctx, self.mcfg = cfg, ctx, mcfg
        self.tokenizer_dir = tokenizer_dir
        self.chat = ChatTokenizer(self.tokenizer_dir)
        self.train, self.val = train, val
        d = cfg.data
        self.row_len = 2 * d.seq_len
        self.sampler = RowSampler(pair_rows(self.train, self.row_len, seed=d.seed, shift=self.shift), seed=d.seed,
                                  rank=ctx.rank, world_size=ctx.world_size)
        self.val_rows = pair_rows(self.val, self.row_len, seed=0, shift=self.shift) if len(self.val) else []

    def batch(self, data: PairExamples, rows: list[list[int]]) -> dict:
        b = row_batch(data.seqs, rows, self.row_len, self.chat.pad_id, self.ctx.device, shift=self.shift)
        seqs = [s for row in rows for s in row]
        b["seqs"] = torch.tensor(seqs, device=self.ctx.device)  # (n,) chosen, rejected, chosen, ...
        pairs = [s // 2 for s in seqs[0::2]]
        b["margin"] = torch.from_numpy(data.margins[pairs]).to(self.ctx.device)
        b["count"] = len(seqs) // 2  # the loss sums over pairs
        return b

    def micro_batch(self, step: int, micro: int) -> dict:
        d = self.cfg.data
        return self.batch(self.train, self.sampler.take((step * d.grad_accum + micro) * d.micro_batch_size,
                                                        d.micro_batch_size))

    def frozen_models(self) -> dict:
        return {}

    def flops_per_token(self) -> float:
        return self.mcfg.flops_per_token(self.row_len)

    @torch.no_grad()
    def evaluate(self, engine) -> dict:
        """Sums of every metric of `pair_losses` over the held-out pairs, all ranks."""
        if not len(self.val):
            return {}
        engine.eval()
        sums: dict[str, float] = {}
        mine = self.val_rows[self.ctx.rank::self.ctx.world_size]
        d = self.cfg.data
        for i in range(0, len(mine), d.micro_batch_size):
            b = self.batch(self.val, mine[i:i + d.micro_batch_size])
            summed, count, metrics = self.pair_losses(engine, b, evaluation=True)
            for k, v in {"loss": (summed.item(), count), **metrics}.items():
                total, n = v
                sums[k] = sums.get(k, 0.0) + total
                sums[k + "#n"] = sums.get(k + "#n", 0.0) + n
        keys = sorted(k for k in sums if not k.endswith("#n"))
        flat = all_reduce_sum([sums[k] for k in keys] + [sums[k + "#n"] for k in keys], self.ctx.device)
        engine.train()
        return {f"val/{k}": flat[i] / max(flat[len(keys) + i], 1) for i, k in enumerate(keys)}

    def loss(self, engine, batch: dict):
        return self.pair_losses(engine, batch)


class RewardTask(PairTask):
    name = "reward"
    shift = False  # scored at each conversation's last token: every token is an input

    def build_model(self) -> torch.nn.Module:
        policy = load_transformer(find_model_dir(self.cfg.init_from), self.mcfg)
        return RewardModel.from_policy(policy).to(self.ctx.device).train()

    def pair_losses(self, engine, b: dict, evaluation: bool = False):
        r = engine(b["x"], b["last"], positions=b["positions"], doc_ids=b["doc_ids"])  # (n,)
        chosen, rejected = r[0::2], r[1::2]
        per_pair = reward_pair_loss(chosen, rejected, b["margin"], center=self.cfg.reward.center)
        p = b["count"]
        with torch.no_grad():
            metrics = {"accuracy": ((chosen > rejected).sum().item(), p),
                       "margin": ((chosen - rejected).sum().item(), p),
                       "chosen": (chosen.sum().item(), p), "rejected": (rejected.sum().item(), p)}
        return per_pair.sum(), p, metrics

    def export(self, state_dict: dict, out_dir: Path) -> None:
        export_reward_model(state_dict, self.mcfg, out_dir, self.tokenizer_dir)


class PairStage(FineTuneStage):
    """reward and dpo: --init, --data with preference pairs, the same planning."""

    data_help = "preference pairs: .json, .jsonl or .parquet files or globs (repeatable)"
    shift = True  # rows hold (input, next-token target) positions; False: every token as input

    def plan(self, cfg, echo=print) -> Plan:
        return plan_pairs(self, cfg, echo, shift=self.shift)


class RewardStage(PairStage):
    name = "reward"
    help = "train a reward model on preference pairs (ShareGPT, trl or OpenAI preference format)"
    config = RewardConfig
    shift = False
    summary_keys = ("val/accuracy", "val/margin")
    next_step = "serve it: zerolm serve --model rm={output} (POST /v1/rewards)"

    def task(self, cfg: RewardConfig, run_dir: Path, ctx: WorkerContext) -> RewardTask:
        return RewardTask(cfg, run_dir, ctx)



STAGE = RewardStage()
