"""The reward model: the decoder's hidden state at the last token of a conversation,
through one linear `score` head, is a scalar reward.

It is the same Transformer (no lm_head) plus `score`, so it starts from an SFT run's
weights, and its export is what transformers calls LlamaForSequenceClassification
(num_labels=1): `model.*` backbone tensors and `score.weight`, scoring the last token
that is not padding. `RewardScorer` is zerolm's own scorer for such a folder (serving,
filtering preference pairs); it gives the scores transformers gives.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from train.export_hf import export_hf, from_hf_state_dict
from train.model import Transformer
from train.model_config import ModelConfig

ARCHITECTURE = "LlamaForSequenceClassification"


class RewardModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Transformer(cfg)
        del self.backbone.output  # no language-model head: the score head reads the hidden state
        self.score = nn.Linear(cfg.dim, 1, bias=False)
        nn.init.normal_(self.score.weight, std=1.0 / (cfg.dim + 1) ** 0.5)

    def forward(self, input_ids: torch.Tensor, last: torch.Tensor, *, positions: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T); last (n,) flat indices into B*T of each sequence's last token
        -> rewards (n,) fp32."""
        h = self.backbone.forward_hidden(input_ids, positions=positions, doc_ids=doc_ids)  # (B, T, C)
        picked = h.reshape(-1, h.shape[-1])[last]  # (n, C)
        return self.score(picked).float()[:, 0]

    @classmethod
    def from_policy(cls, policy: Transformer) -> "RewardModel":
        """A reward model whose backbone is a copy of a language model's weights."""
        rm = cls(policy.cfg)
        state = {k: v for k, v in policy.state_dict().items() if not k.startswith("output.")}
        rm.backbone.load_state_dict(state, strict=False)
        return rm


def is_reward_model(model_dir: str | Path) -> bool:
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return ARCHITECTURE in (cfg.get("architectures") or [])


def export_reward_model(state: dict, cfg: ModelConfig, out_dir: Path, tokenizer_dir: Path) -> Path:
    """A LlamaForSequenceClassification folder: the backbone exported as a Llama model
    (no lm_head), config.json turned into a one-label classifier, score.weight added."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    score = state["score.weight"].detach().float().cpu().contiguous()
    tied = cfg.model_copy(update={"tie_embeddings": True})  # exports no lm_head
    backbone["output.weight"] = backbone["tok_embeddings.weight"]
    out = export_hf(backbone, tied, out_dir, tokenizer_dir=tokenizer_dir, chat=True)
    tensors = load_file(str(out / "model.safetensors"))
    tensors["score.weight"] = score
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf = json.loads((out / "config.json").read_text(encoding="utf-8"))
    hf.update({"architectures": [ARCHITECTURE], "num_labels": 1, "id2label": {"0": "LABEL_0"},
               "label2id": {"LABEL_0": 0}, "problem_type": "regression", "tie_word_embeddings": False})
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
    cfg.save(out)  # the true config (tie_embeddings as trained; there is no head to tie)
    (out / "generation_config.json").unlink(missing_ok=True)  # a classifier does not generate
    return out


def load_reward_model(model_dir: str | Path, *, device="cpu", dtype=torch.float32) -> RewardModel:
    from train.weights import model_config_of

    model_dir = Path(model_dir)
    cfg = model_config_of(model_dir)
    tensors = load_file(str(model_dir / "model.safetensors"))
    score = tensors.pop("score.weight")
    rm = RewardModel(cfg)
    state = from_hf_state_dict(tensors)
    missing, unexpected = rm.backbone.load_state_dict(state, strict=False)
    if [k for k in missing if not k.startswith("output.")] or unexpected:
        raise ValueError(f"{model_dir}: reward model weights do not match its config")
    rm.score.weight.data.copy_(score)
    rm = rm.to(device=device, dtype=dtype).eval()
    rm.backbone.rope_tables_fp32()
    return rm


class RewardScorer:
    """Scores conversations with a reward-model folder: each rendered with the chat
    template (no generation prompt) and scored at its last token."""

    def __init__(self, model_dir: str | Path, *, device="cpu", max_batch: int = 16):
        from train.chat import ChatTokenizer

        self.dir = Path(model_dir)
        self.model = load_reward_model(self.dir, device=device)
        self.chat = ChatTokenizer(self.dir)
        self.device, self.max_batch = torch.device(device), max_batch
        self.context = self.model.cfg.max_seq_len

    def ids(self, conversation: list[dict]) -> list[int]:
        return self.chat.tok.encode(self.chat.render(conversation), add_special_tokens=False).ids

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]]) -> list[float]:
        out = []
        for i in range(0, len(sequences), self.max_batch):
            chunk = sequences[i:i + self.max_batch]
            if any(len(s) > self.context or not s for s in chunk):
                raise ValueError(f"a conversation is empty or longer than the model's context ({self.context})")
            T = max(map(len, chunk))
            x = torch.full((len(chunk), T), self.chat.pad_id, dtype=torch.long)
            for r, s in enumerate(chunk):
                x[r, :len(s)] = torch.tensor(s)
            last = torch.tensor([r * T + len(s) - 1 for r, s in enumerate(chunk)])
            # right padding after each sequence's end cannot reach it: attention is causal
            out += self.model(x.to(self.device), last.to(self.device)).tolist()
        return out

    def score(self, conversations: list[list[dict]]) -> list[float]:
        return self.score_ids([self.ids(c) for c in conversations])
