"""`zerolm train ppo`: PPO with a critic, a frozen reference and a reward.

    zerolm train ppo --init SFT_RUN --reward RM_RUN --prompts FILE --output RUN_DIR

The trained module is the actor (the policy) and the critic (a value head on its own
decoder: initialised from the reward model when the reward is one, else from the
actor) under one optimizer. Per answer token the reward is -β · KL(policy || ref)
(k1 by default, as InstructGPT), plus the reward's score at the answer's last token;
advantages by GAE(γ, λ) on the critic's values, whitened over the rollout; several
PPO epochs per rollout (policy.epochs) with the clipped policy loss and the clipped
value loss. Metrics: reward, kl, entropy (sampled estimate), value loss, clip fraction,
response length, rollout tokens/s. The export is the actor alone.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field
from torch import nn

from train.losses import clipped_policy_loss, clipped_value_loss, gae, kl_penalty, masked_whiten
from train.reward_model import RewardModel, load_reward_model
from train.rewards import RULES
from train.rl import PolicySection, RLConfig, RLStage, RLTask
from train.weights import find_model_dir, load_transformer
from zerolm.config import StrictModel


class PPOSection(StrictModel):
    gamma: float = Field(default=1.0, gt=0, le=1)
    lam: float = Field(default=0.95, ge=0, le=1)
    vf_coef: float = Field(default=0.1, ge=0)
    value_clip: float = Field(default=0.2, gt=0)
    whiten_advantages: bool = True


class PPOConfig(RLConfig):
    ppo: PPOSection = Field(default_factory=PPOSection)
    policy: PolicySection = Field(default_factory=lambda: PolicySection(kl_coef=0.05, kl_estimator="k1", epochs=2))


class ActorCritic(nn.Module):
    """The policy and the critic, trained together. forward(x, y) returns (values,
    per-token NLL) (B, T) each: the (first, loss) shape of Transformer.forward, so the
    policy's log-probs are read the same way as for any other policy."""

    def __init__(self, policy: nn.Module, critic: RewardModel):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, x: torch.Tensor, y: torch.Tensor, reduction: str = "none"):
        _, nll = self.policy(x, y, reduction="none")  # (B, T)
        values = self.critic.score(self.critic.backbone.forward_hidden(x)).float()[..., 0]  # (B, T)
        return values, nll


class PPOTask(RLTask):
    name = "ppo"

    def build_model(self) -> torch.nn.Module:
        policy = load_transformer(find_model_dir(self.cfg.init_from), self.mcfg)
        parts = self.cfg.reward.split("+")
        if len(parts) == 1 and parts[0] not in RULES:  # the reward is one reward model (checked in plan)
            critic = load_reward_model(find_model_dir(Path(parts[0])))  # values start from the reward's view
        else:
            critic = RewardModel.from_policy(policy)
        return ActorCritic(policy, critic).to(self.ctx.device).train()

    def actor_weights(self, state: dict) -> dict:
        return {k.removeprefix("module.").removeprefix("policy."): v for k, v in state.items()
                if k.removeprefix("module.").startswith("policy.")}

    def extra_rollout_tensors(self, engine, data: dict) -> None:
        mb, values, logps = self.cfg.data.micro_batch_size, [], []
        for i in range(0, data["x"].shape[0], mb):
            v, nll = engine(data["x"][i:i + mb], data["y"][i:i + mb])
            values.append(v)
            logps.append(-nll)
        data["old_values"], data["old_logp"] = torch.cat(values) * data["mask"], torch.cat(logps)

    def advantages(self, data: dict) -> None:
        p, q = self.cfg.policy, self.cfg.ppo
        mask = data["mask"]
        per_token = -p.kl_coef * kl_penalty(data["old_logp"], data["ref_logp"], p.kl_estimator) * mask  # (N, T)
        T = mask.shape[1]
        last = (mask * torch.arange(T, device=mask.device)).argmax(dim=1)  # each answer's final token
        per_token[torch.arange(mask.shape[0], device=mask.device), last] += data["rewards"]
        adv, returns = gae(per_token, data["old_values"], mask, q.gamma, q.lam)
        data["advantages"] = masked_whiten(adv, mask) if q.whiten_advantages else adv
        data["returns"] = returns

    def loss(self, engine, b: dict):
        p, q = self.cfg.policy, self.cfg.ppo
        values, nll = engine(b["x"], b["y"])
        logp, mask = -nll, b["mask"]
        pg, clipped = clipped_policy_loss(logp, b["old_logp"], b["advantages"], p.clip)
        vf = clipped_value_loss(values, b["old_values"], b["returns"], q.value_clip)
        summed = ((pg + q.vf_coef * vf) * mask).sum()
        with torch.no_grad():
            kl = kl_penalty(logp, b["ref_logp"], p.kl_estimator)
        return summed, b["count"], self.token_metrics(b, logp, kl=kl, value_loss=vf.detach(), clip_fraction=clipped)


class PPOStage(RLStage):
    name = "ppo"
    help = "PPO with a critic, a frozen reference and a reward model (or rule rewards)"
    config = PPOConfig
    task_class = PPOTask


STAGE = PPOStage()
