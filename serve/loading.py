"""Loading a served model from a folder: an HF export (RUN_DIR/hf) or a run folder
holding one. Weights are read by train/weights.py, the one loader that training
stages (`init_from`) use too: the model is rebuilt from model_config.json alone and
its weights read from safetensors (no pickle; nothing but tensors is deserialized).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from train.model import Transformer
from train.model_config import ModelConfig
from train.chat import tokenizer_settings
from train.weights import find_model_dir, load_transformer, model_config_of
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


def tokenizer_meta(model_dir: Path, tok: Tokenizer) -> TokenizerMeta:
    cfg, template = tokenizer_settings(model_dir)
    specials = {t.content: t_id for t_id, t in tok.get_added_tokens_decoder().items() if t.special}
    stops = tuple(specials[s] for s in ("<|im_end|>", "<|endoftext|>") if s in specials)
    return TokenizerMeta(eos_token=cfg.get("eos_token"), bos_token=cfg.get("bos_token"),
                         pad_token=cfg.get("pad_token"), chat_template=template, specials=specials, stop_ids=stops)


def load_model(name: str, path: str | Path, device: str = "auto", dtype: str = "auto", *,
               weights: bool = True) -> LoadedModel:
    """Config, tokenizer and (unless weights=False) the weights on device."""
    model_dir = find_model_dir(path)
    cfg = model_config_of(model_dir)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    dt = {"auto": torch.bfloat16 if dev.type == "cuda" else torch.float32, "float32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if not (model_dir / "tokenizer.json").is_file():
        raise UserError(f"{model_dir} has no tokenizer.json")
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    model = load_transformer(model_dir, cfg, device=dev, dtype=dt) if weights else None
    return LoadedModel(name=name, path=model_dir, config=cfg, model=model, tokenizer=tok,
                       meta=tokenizer_meta(model_dir, tok), device=dev, dtype=dt)
