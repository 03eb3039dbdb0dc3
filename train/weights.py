"""Where earlier weights come from: the one place that reads a model folder's weights,
used by training stages (`init_from`) and by serving alike.

A model folder is a zerolm HF export (RUN_DIR/hf: model_config.json, model.safetensors,
tokenizer files), a run folder holding one, or a plain HF Llama folder (config.json +
safetensors, single file or sharded), whose config.json is translated to a
ModelConfig. Weights are read from safetensors only: nothing but tensors is ever
deserialized from a file a user points at.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from train.export_hf import from_hf_state_dict, model_config_from_hf
from train.model import Transformer
from train.model_config import CONFIG_NAME, ModelConfig
from zerolm.errors import UserError

SHARD_INDEX = "model.safetensors.index.json"


def _has_weights(d: Path) -> bool:
    return (d / "model.safetensors").is_file() or (d / SHARD_INDEX).is_file()


def find_model_dir(path: str | Path) -> Path:
    """RUN_DIR -> RUN_DIR/hf; an export or HF folder is returned as is."""
    path = Path(path)
    for candidate in (path, path / "hf"):
        if _has_weights(candidate) and ((candidate / CONFIG_NAME).is_file() or (candidate / "config.json").is_file()):
            return candidate
    if not path.exists():
        raise UserError(f"{path} does not exist (expected a run folder or an HF model folder)")
    raise UserError(f"{path} is not a model folder (needs model_config.json or config.json, and model.safetensors; "
                    "e.g. a finished run or its hf/ export)")


def model_config_of(model_dir: Path) -> ModelConfig:
    """model_config.json when zerolm wrote the folder, else a Llama config.json."""
    if (model_dir / CONFIG_NAME).is_file():
        return ModelConfig.load(model_dir)
    try:
        hf = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{model_dir}/config.json is not readable JSON ({exc})")
    return model_config_from_hf(hf, str(model_dir))


def _weight_files(model_dir: Path) -> list[Path]:
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    index = json.loads((model_dir / SHARD_INDEX).read_text(encoding="utf-8"))
    return [model_dir / name for name in sorted(set(index["weight_map"].values()))]


def weights_sha256(model_dir: Path) -> str:
    """Content hash of the weights (recorded in run.json: which weights a stage started from)."""
    h = hashlib.sha256()
    for f in _weight_files(model_dir):
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def load_transformer(model_dir: str | Path, cfg: ModelConfig | None = None, *, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> Transformer:
    """The Transformer of a model folder, weights checked against its config, in eval
    mode (a training stage calls .train() on its own copy)."""
    model_dir = Path(model_dir)
    cfg = cfg or model_config_of(model_dir)
    state: dict = {}
    for f in _weight_files(model_dir):
        state.update(load_file(str(f)))
    try:
        state = from_hf_state_dict(state)
    except KeyError as exc:
        raise UserError(f"{model_dir}: the weights do not match a Llama model ({exc.args[0]})") from None
    return transformer_from_state(state, cfg, device=device, dtype=dtype, where=str(model_dir))


def load_state_into(model: Transformer, state: dict, where: str = "state dict") -> None:
    """Copy `state` (our parameter names; a DeepSpeed "module." prefix is dropped) into
    model's parameters in place, checked: every tensor, none unknown (the lm_head may be
    missing when tied to the embedding)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"output.weight"} if model.cfg.tie_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise UserError(f"{where}: weights do not match the model config "
                        f"(missing {sorted(set(missing) - allowed_missing)[:3]}, unexpected {unexpected[:3]})")


def transformer_from_state(state: dict, cfg: ModelConfig, *, device: torch.device | str = "cpu",
                           dtype: torch.dtype = torch.float32, where: str = "state dict") -> Transformer:
    """A Transformer holding `state` (our parameter names; a DeepSpeed "module." prefix is
    dropped), checked against cfg, on device in dtype, in eval mode, RoPE tables fp32."""
    model = Transformer(cfg)
    load_state_into(model, state, where)
    model = model.to(device=device, dtype=dtype).eval()
    model.rope_tables_fp32()
    return model


@dataclass(frozen=True)
class InitSource:
    """The earlier weights a stage starts from (`init_from`)."""

    path: str  # as given (absolute)
    model_dir: Path  # the folder holding the weights and tokenizer
    config: ModelConfig
    sha256: str
    stage: str | None  # the stage that produced it, when it is a zerolm run

    def lineage(self) -> dict:
        tokenizer = hashlib.sha256((self.model_dir / "tokenizer.json").read_bytes()).hexdigest()
        return {"path": self.path, "model_dir": str(self.model_dir), "weights_sha256": self.sha256,
                "tokenizer_sha256": tokenizer, "stage": self.stage}


def resolve_init(path: str) -> InitSource:
    """Check `init_from` before anything starts: a folder with weights, a config and a
    tokenizer. A run folder must be finished (its _SUCCESS written)."""
    if not path:
        raise UserError("no initial weights: give --init RUN_DIR_OR_HF_DIR")
    p = Path(path)
    model_dir = find_model_dir(p)
    stage = None
    if model_dir != p or (p / "_SUCCESS").exists():
        try:
            stage = json.loads((p / "_SUCCESS").read_text(encoding="utf-8")).get("stage")
        except FileNotFoundError:
            raise UserError(f"{p} is an unfinished run (no _SUCCESS): finish it or point --init at another one")
        except json.JSONDecodeError:
            raise UserError(f"{p}/_SUCCESS is corrupt")
    if not (model_dir / "tokenizer.json").is_file():
        raise UserError(f"{model_dir} has no tokenizer.json")
    return InitSource(path=str(p), model_dir=model_dir, config=model_config_of(model_dir),
                      sha256=weights_sha256(model_dir), stage=stage)

