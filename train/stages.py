"""The registry of training stages: `zerolm train STAGE` works for every name here.

A stage is one module defining `STAGE`, an instance of `train.runner.Stage` (its
config, CLI flags, planning and `Task`), plus one line below. Modules are imported
only when a stage is used, so commands that never train do not pay for torch.
"""

from __future__ import annotations

import importlib

from zerolm.errors import UserError

STAGES = {
    "pretrain": "train.pretrain:STAGE",
    "sft": "train.sft:STAGE",
    "reward": "train.reward:STAGE",
    "dpo": "train.dpo:STAGE",
    "grpo": "train.grpo:STAGE",
    "ppo": "train.ppo:STAGE",
}


def get_stage(name: str):
    if name not in STAGES:
        raise UserError(f"unknown training stage {name!r}; stages: {', '.join(STAGES)}")
    module, attr = STAGES[name].split(":")
    return getattr(importlib.import_module(module), attr)
