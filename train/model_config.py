"""ModelConfig: the one description of the decoder's shape, saved beside every checkpoint.

`serve` and `export_hf` rebuild the model from `model_config.json` alone, so every
architectural choice lives here (nothing is inferred from a state dict). Presets give
named sizes; `vocab_size` in a preset is a placeholder that the training stage
overrides with the tokenizer's vocabulary size.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from zerolm.config import StrictModel, format_validation_error
from zerolm.errors import UserError

CONFIG_NAME = "model_config.json"


class ModelConfig(StrictModel):
    """A Llama-style decoder (pre-norm RMSNorm, RoPE, GQA, SwiGLU)."""

    vocab_size: int = Field(gt=0)
    dim: int = Field(gt=0)
    n_layers: int = Field(gt=0)
    n_heads: int = Field(gt=0)
    n_kv_heads: int | None = Field(default=None, gt=0)  # None -> n_heads (plain MHA)
    ffn_hidden: int | None = Field(default=None, gt=0)  # None -> Llama rule below
    multiple_of: int = Field(default=256, gt=0)
    ffn_dim_multiplier: float | None = Field(default=None, gt=0)
    max_seq_len: int = Field(gt=0)
    rope_theta: float = Field(default=10000.0, gt=0)
    norm_eps: float = Field(default=1e-5, gt=0)
    tie_embeddings: bool = False
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    bias: bool = False  # biases on every Linear (zero-initialised); Llama has none

    @model_validator(mode="before")
    @classmethod
    def _default_kv_heads(cls, data: Any) -> Any:
        # Resolve here (not in an after-validator) so the saved JSON says what was built.
        if isinstance(data, dict) and data.get("n_kv_heads") is None and "n_heads" in data:
            data = {**data, "n_kv_heads": data["n_heads"]}
        return data

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"n_kv_heads ({self.kv_heads}) must divide n_heads ({self.n_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim (dim / n_heads = {self.head_dim}) must be even for RoPE")
        return self

    # ---- derived sizes -------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def ffn_dim(self) -> int:
        """SwiGLU hidden size: explicit, or Llama's 2/3·4·dim scaled and rounded up."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count of `Transformer(self)`, computed from the shapes.

        exclude_embeddings drops the input token table only; an untied lm_head stays
        because it is a real matmul (this is the N that goes into 6N FLOPs).
        """
        d, kv_dim, f, b = self.dim, self.kv_heads * self.head_dim, self.ffn_dim, int(self.bias)
        attn = 2 * (d * d + b * d) + 2 * (d * kv_dim + b * kv_dim)  # wq, wo, wk, wv
        mlp = 2 * (d * f + b * f) + (f * d + b * d)  # w1, w3, w2
        per_layer = attn + mlp + 2 * d  # + two RMSNorm weights
        emb = self.vocab_size * d
        head = 0 if self.tie_embeddings else emb
        total = self.n_layers * per_layer + d + emb + head  # + final norm
        return total - emb if exclude_embeddings else total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, 6N + 12·L·d·T (PaLM appendix B / nanoGPT), for MFU.

        N counts every matmul weight including the lm_head (even when tied), not the
        embedding lookup; the second term is attention scores + values over T keys.
        """
        t = seq_len if seq_len is not None else self.max_seq_len
        n = self.num_params(exclude_embeddings=True)
        if self.tie_embeddings:
            n += self.vocab_size * self.dim
        return 6.0 * n + 12.0 * self.n_layers * self.dim * t

    # ---- persistence ---------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write JSON to `path` (a directory gets `model_config.json`), atomically."""
        path = _resolve(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = _resolve(path)
        if not path.is_file():
            raise UserError(f"model config not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"model config {path} is not valid JSON: {exc}") from None
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise UserError(f"model config {path}: {format_validation_error(exc)}") from None


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    return path if path.suffix == ".json" else path / CONFIG_NAME


# vocab_size 32000 is a placeholder: training overrides it with the tokenizer's size.
PRESETS: dict[str, dict] = {
    # CPU smoke / learning run: ~3.1M non-embedding params.
    "tiny": dict(vocab_size=32000, dim=256, n_layers=4, n_heads=4, n_kv_heads=2,
                 max_seq_len=256, tie_embeddings=True),
    # ~24.9M total with vocab 32000 (tied; 12.6M non-embedding).
    "25m": dict(vocab_size=32000, dim=384, n_layers=8, n_heads=6, n_kv_heads=2,
                max_seq_len=1024, tie_embeddings=True),
    # 124.7M total with untied embeddings (100.1M if tied).
    "125m": dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4,
                 ffn_hidden=2048, max_seq_len=1024, tie_embeddings=False),
    # ~348.7M total, untied.
    "350m": dict(vocab_size=32000, dim=1024, n_layers=24, n_heads=16, n_kv_heads=8,
                 max_seq_len=2048, tie_embeddings=False),
}


def from_preset(name: str, **overrides: Any) -> ModelConfig:
    """Build a preset, with keyword overrides (e.g. vocab_size from the tokenizer)."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    data = {**PRESETS[name], **overrides}
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"model preset {name!r}: {format_validation_error(exc)}") from None
