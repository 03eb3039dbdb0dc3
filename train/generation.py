"""Generating with the weights being trained, through the serving engine.

Evaluation during training (SFT's end rate; preference pairs and rollouts later)
samples with the same engine `zerolm serve` runs (batched, KV-cached, seeded), on
the model's own forward. The engine holds its own copy of the current weights, in
the serving dtype, so generating never touches the trained model (nor its autograd
state), and each call sees the weights of that moment. Under ZeRO-3 every rank holds
a shard, so the full weights are gathered first (a collective: every rank must call
`current_weights`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from train.model_config import ModelConfig
from train.weights import load_state_into, transformer_from_state


def current_weights(engine) -> dict[str, torch.Tensor]:
    """Full state dict of a DeepSpeed engine's module (or a plain module), on its device."""
    module = getattr(engine, "module", engine)
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if params:  # ZeRO-3 partitioned parameters
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def engine_for(state: dict, mcfg: ModelConfig, tokenizer_dir: str | Path, device: torch.device,
               *, max_batch: int = 64):
    """A serving Engine over a copy of `state`, in the serving dtype of the device."""
    from serve.engine import Engine
    from serve.loading import LoadedModel, tokenizer_meta

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = transformer_from_state(state, mcfg, device=device, dtype=dtype, where="the trained model")
    tokenizer_dir = Path(tokenizer_dir)
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    loaded = LoadedModel(name="training", path=tokenizer_dir, config=mcfg, model=model, tokenizer=tok,
                         meta=tokenizer_meta(tokenizer_dir, tok), device=device, dtype=dtype)
    return Engine(loaded, max_batch=max_batch, cuda_graphs=False)


class PolicySampler:
    """A serving Engine that follows the trained policy: `refresh` copies the current
    weights into its own model (in place: the engine, its tokenizer side and its
    buffers are made once), then `generate` samples with them. Rollouts run here, in
    the training process, between optimizer steps (see train/rl.py for why)."""

    def __init__(self, state: dict, mcfg: ModelConfig, tokenizer_dir: str | Path, device: torch.device):
        self.engine = engine_for(state, mcfg, tokenizer_dir, device)

    @torch.no_grad()
    def refresh(self, state: dict) -> None:
        load_state_into(self.engine.m.model, state, "the policy's weights")

    def generate(self, requests):
        return self.engine.generate(requests)
