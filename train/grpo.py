"""`zerolm train grpo`: group-relative policy optimisation (no critic).

    zerolm train grpo --init SFT_RUN --prompts FILE --reward arithmetic --output RUN_DIR

Each prompt is answered `rollout.samples` (G) times; an answer's advantage is its
reward against its group's (`grpo.baseline`: grpo = standardised within the group,
rloo = leave-one-out mean, reinforce++ = group-centred and whitened over the batch),
the same for each of its tokens. Loss per answer token: PPO's clipped surrogate plus
β · KL(policy || reference) (k3 estimator by default, in the loss as GRPO does).
Metrics per step: reward, kl, clip fraction, entropy (sampled estimate), response
length, rollout tokens/s; per evaluation the held-out greedy reward and end rate.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from train.losses import RL_BASELINES, clipped_policy_loss, group_advantages, kl_penalty
from train.rl import RLConfig, RLStage, RLTask
from train.weights import find_model_dir, load_transformer
from zerolm.config import StrictModel


class GRPOSection(StrictModel):
    baseline: Literal[RL_BASELINES] = "grpo"  # type: ignore[valid-type]


class GRPOConfig(RLConfig):
    grpo: GRPOSection = Field(default_factory=GRPOSection)


class GRPOTask(RLTask):
    name = "grpo"

    def build_model(self) -> torch.nn.Module:
        return load_transformer(find_model_dir(self.cfg.init_from), self.mcfg, device=self.ctx.device).train()

    def extra_rollout_tensors(self, engine, data: dict) -> None:
        if self.spr > 1:  # with one update per rollout the old policy is the current one: ratio 1
            data["old_logp"] = self._logp_chunks(engine, data)

    def advantages(self, data: dict) -> None:
        adv = group_advantages(data["rewards"], self.cfg.rollout.samples, self.cfg.grpo.baseline)  # (N,)
        data["advantages"] = adv[:, None].expand_as(data["mask"]).contiguous()  # every token of an answer

    def loss(self, engine, b: dict):
        p = self.cfg.policy
        logp = self.token_logp(engine, b["x"], b["y"])  # (B, T)
        old = b["old_logp"] if "old_logp" in b else logp.detach()
        pg, clipped = clipped_policy_loss(logp, old, b["advantages"], p.clip)
        kl = kl_penalty(logp, b["ref_logp"], p.kl_estimator)
        summed = ((pg + p.kl_coef * kl) * b["mask"]).sum()
        return summed, b["count"], self.token_metrics(b, logp, kl=kl, clip_fraction=clipped)


class GRPOStage(RLStage):
    name = "grpo"
    help = "GRPO / RLOO / REINFORCE++ online RL with rule rewards or a reward model (no critic)"
    config = GRPOConfig
    task_class = GRPOTask


STAGE = GRPOStage()
