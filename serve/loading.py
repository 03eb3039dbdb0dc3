"""Loading a served model from a folder: an HF export (RUN_DIR/hf) or a run folder
holding one. The model is rebuilt from model_config.json alone and its weights read
from safetensors (no pickle; nothing but tensors is ever deserialized).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from train.export_hf import from_hf_state_dict
from train.model import Transformer
from train.model_config import ModelConfig
from zerolm.errors import UserError


@dataclass
class TokenizerMeta:
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    chat_template: str | None
    specials: dict = field(default_factory=dict)  # token -> id
    stop_ids: tuple = ()  # generation stops on these (chat end, document end)


@dataclass
class LoadedModel:
    name: str
    path: Path
    config: ModelConfig
    model: Transformer | None  # None: tokenizer side only (the server's HTTP process)
    tokenizer: Tokenizer
    meta: TokenizerMeta
    device: torch.device
    dtype: torch.dtype


def find_model_dir(path: str | Path) -> Path:
    """RUN_DIR -> RUN_DIR/hf; an export folder is returned as is."""
    path = Path(path)
    for candidate in (path, path / "hf"):
        if (candidate / "model_config.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    raise UserError(f"{path} is not a zerolm model folder (needs model_config.json and model.safetensors, "
                    "e.g. a run's hf/ export)")


def _tokenizer_meta(model_dir: Path, tok: Tokenizer) -> TokenizerMeta:
    try:
        cfg = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        cfg = {}
    template = cfg.get("chat_template")
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    specials = {t.content: t_id for t_id, t in tok.get_added_tokens_decoder().items() if t.special}
    stops = tuple(specials[s] for s in ("<|im_end|>", "<|endoftext|>") if s in specials)
    return TokenizerMeta(eos_token=cfg.get("eos_token"), bos_token=cfg.get("bos_token"),
                         pad_token=cfg.get("pad_token"), chat_template=template, specials=specials, stop_ids=stops)


def load_model(name: str, path: str | Path, device: str = "auto", dtype: str = "auto", *,
               weights: bool = True) -> LoadedModel:
    """Config, tokenizer and (unless weights=False) the weights on device."""
    model_dir = find_model_dir(path)
    cfg = ModelConfig.load(model_dir)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    dt = {"auto": torch.bfloat16 if dev.type == "cuda" else torch.float32, "float32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if not (model_dir / "tokenizer.json").is_file():
        raise UserError(f"{model_dir} has no tokenizer.json")
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    model = _load_weights(model_dir, cfg, dev, dt) if weights else None
    return LoadedModel(name=name, path=model_dir, config=cfg, model=model, tokenizer=tok,
                       meta=_tokenizer_meta(model_dir, tok), device=dev, dtype=dt)


def _load_weights(model_dir: Path, cfg: ModelConfig, dev: torch.device, dt: torch.dtype) -> Transformer:
    state = from_hf_state_dict(load_file(str(model_dir / "model.safetensors")))
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"output.weight"} if cfg.tie_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise UserError(f"{model_dir}: weights do not match model_config.json "
                        f"(missing {sorted(set(missing) - allowed_missing)[:3]}, unexpected {unexpected[:3]})")
    model = model.to(device=dev, dtype=dt).eval()
    model.rope_cos, model.rope_sin = model.rope_cos.float(), model.rope_sin.float()  # keep RoPE tables fp32
    return model
