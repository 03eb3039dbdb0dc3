"""Export a zerolm Transformer to a HF `LlamaForCausalLM` folder.

The output loads with `AutoModelForCausalLM.from_pretrained(dir)` and
`AutoTokenizer.from_pretrained(dir)` (no trust_remote_code). Our model already uses
HF's RoPE layout and GQA head order, so conversion is renaming, plus splitting our
fused `wqkv` (q, k, v rows) and `w13` (gate, up rows) into HF's separate projections
(and joining them on the way back). The folder is
written to a temporary sibling and renamed into place, so a crash never leaves a
half export that looks complete.

`train` may run on nodes without `transformers`; nothing here imports it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Mapping

import torch
from pydantic import ValidationError
from safetensors.torch import save_file
from torch import nn

from dataproc.tokenizer import ENDOFTEXT, IM_END, copy_tokenizer_files
from train.model_config import ModelConfig
from zerolm.config import format_validation_error
from zerolm.errors import UserError

# Prefixes wrappers add to parameter names: DeepSpeed / DDP, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_LAYER_MAP = {
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Our fused Linears -> the HF projections they stack, in row order.
_FUSED = {
    "attention.wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "feed_forward.w13": ("mlp.gate_proj", "mlp.up_proj"),
}
_TOP_MAP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}


def _fused_rows(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    kv = cfg.kv_heads * cfg.head_dim
    return {"attention.wqkv": (cfg.n_heads * cfg.head_dim, kv, kv), "feed_forward.w13": (cfg.ffn_dim, cfg.ffn_dim)}


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if name.startswith(prefix):
                    name, changed = name[len(prefix):], True
        out[name] = tensor
    return out


def _hf_tensors(name: str, tensor: torch.Tensor, rows: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """One of our tensors -> its HF name(s) and tensor(s) (a fused one splits by rows)."""
    module, _, kind = name.rpartition(".")  # kind: weight | bias
    if module.startswith("layers."):
        _, idx, rest = module.split(".", 2)
        if rest in _LAYER_MAP:
            return {f"model.layers.{idx}.{_LAYER_MAP[rest]}.{kind}": tensor}
        if rest in _FUSED:
            if tensor.shape[0] != sum(rows[rest]):
                raise ValueError(f"{name} has {tensor.shape[0]} rows, the config gives {sum(rows[rest])}")
            parts = torch.split(tensor, rows[rest], dim=0)
            return {f"model.layers.{idx}.{hf}.{kind}": part for hf, part in zip(_FUSED[rest], parts)}
    elif module in _TOP_MAP:
        return {f"{_TOP_MAP[module]}.{kind}": tensor}
    raise ValueError(f"unexpected tensor in state dict: {name}")


def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig,
                     dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Rename our tensors to HF Llama names (splitting the fused ones), cast, make
    contiguous, and check that exactly the expected set is there (lm_head is dropped
    when embeddings are tied)."""
    sd = strip_wrapper_prefixes(state_dict)
    if cfg.tie_embeddings:
        sd.pop("output.weight", None)  # same storage as the embedding; safetensors refuses aliases
    rows = _fused_rows(cfg)
    out = {}
    for k, v in sd.items():
        for name, t in _hf_tensors(k, v, rows).items():
            out[name] = t.detach().to(device="cpu", dtype=dtype).contiguous()
    expected = set(expected_hf_names(cfg))
    missing, unexpected = expected - out.keys(), out.keys() - expected
    if missing or unexpected:
        raise ValueError(f"state dict does not match the config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    return out


def from_hf_state_dict(hf_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `to_hf_state_dict` (load with `strict=False` when tied: no lm_head).
    A layer missing one of a fused group's projections raises KeyError naming it."""
    inv_layer = {v: k for k, v in _LAYER_MAP.items()}
    inv_fused = {hf: ours for ours, group in _FUSED.items() for hf in group}
    inv_top = {v: k for k, v in _TOP_MAP.items()}
    out, groups = {}, {}
    for name, tensor in hf_state_dict.items():
        module, _, kind = name.rpartition(".")
        if module.startswith("model.layers."):
            _, _, idx, rest = module.split(".", 3)
            if rest in inv_fused:
                groups.setdefault((idx, inv_fused[rest], kind), {})[rest] = tensor
            else:
                out[f"layers.{idx}.{inv_layer[rest]}.{kind}"] = tensor
        else:
            out[f"{inv_top[module]}.{kind}"] = tensor
    for (idx, ours, kind), parts in groups.items():
        missing = [hf for hf in _FUSED[ours] if hf not in parts]
        if missing:
            raise KeyError(f"model.layers.{idx}: no {missing[0]}.{kind}")
        out[f"layers.{idx}.{ours}.{kind}"] = torch.cat([parts[hf] for hf in _FUSED[ours]], dim=0)
    return out


def expected_hf_names(cfg: ModelConfig) -> list[str]:
    kinds = ("weight", "bias") if cfg.bias else ("weight",)
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_embeddings:
        names.append("lm_head.weight")
    norms = [hf for ours, hf in _LAYER_MAP.items() if ours.endswith("norm")]
    projections = [hf for ours, hf in _LAYER_MAP.items() if not ours.endswith("norm")]
    projections += [hf for group in _FUSED.values() for hf in group]
    for i in range(cfg.n_layers):
        names += [f"model.layers.{i}.{hf}.weight" for hf in norms]
        names += [f"model.layers.{i}.{hf}.{kind}" for hf in projections for kind in kinds]
    return names


# ModelConfig field -> the config.json key that holds it: written by `hf_config` and
# read back by `model_config_from_hf`, so the two directions cannot drift apart.
_CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "dim": "hidden_size",
    "ffn_hidden": "intermediate_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "max_seq_len": "max_position_embeddings",
    "norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "tie_embeddings": "tie_word_embeddings",
    "bias": "attention_bias",
}
# Read with transformers' defaults when a config.json leaves them out.
_HF_DEFAULTS = {"num_key_value_heads": None, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                "tie_word_embeddings": False, "attention_bias": False}


def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32, *, bos_token_id: int | None = None,
              eos_token_id: int | None = None, pad_token_id: int | None = None) -> dict:
    """config.json for LlamaForCausalLM. transformers 5 reads RoPE from `rope_parameters`,
    4.x from top-level `rope_theta`; both are written (each ignores the other's key)."""
    dtype_name = str(dtype).removeprefix("torch.")
    resolved = {**cfg.model_dump(), "ffn_hidden": cfg.ffn_dim, "n_kv_heads": cfg.kv_heads}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **{hf: resolved[ours] for ours, hf in _CONFIG_KEYS.items()},
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "attention_dropout": 0.0,
        "mlp_bias": cfg.bias,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        # transformers >= 4.56 reads `dtype`; 5.x warns on the older `torch_dtype` key.
        "dtype": dtype_name,
    }


def model_config_from_hf(hf: dict, where: str) -> ModelConfig:
    """The ModelConfig of a Llama config.json (ours, or any LlamaForCausalLM's that
    transformers saved). What our Transformer cannot compute exactly is refused with a
    one-line UserError naming the config.json field."""
    def refuse(field: str, value, why: str):
        raise UserError(f"{where}: {field} = {json.dumps(value)} is not supported ({why})")

    if hf.get("model_type") != "llama":
        refuse("model_type", hf.get("model_type"), "only Llama-architecture folders load")
    # transformers 5 keeps RoPE settings in rope_parameters, 4.x in rope_theta / rope_scaling
    rope = hf.get("rope_parameters") or {}
    for field, scaling in (("rope_parameters", rope), ("rope_scaling", hf.get("rope_scaling") or {})):
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in (None, "default"):
            refuse(f"{field}.rope_type", kind, "RoPE scaling; only plain RoPE is implemented")
    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", hf["hidden_act"], "the MLP is SwiGLU: silu only")
    if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
        refuse("mlp_bias", hf.get("mlp_bias", False), "zerolm models have biases on every projection or none, "
               f"and attention_bias is {json.dumps(hf.get('attention_bias', False))}")
    if hf.get("quantization_config"):
        refuse("quantization_config", (hf["quantization_config"] or {}).get("quant_method"),
               "quantized weights")
    head_dim = hf.get("head_dim")
    if head_dim is not None and "hidden_size" in hf and "num_attention_heads" in hf \
            and head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        refuse("head_dim", head_dim, f"it must be hidden_size / num_attention_heads = "
               f"{hf['hidden_size']} / {hf['num_attention_heads']}")
    values = {**_HF_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    if "rope_theta" in rope:
        values["rope_theta"] = rope["rope_theta"]
    missing = [hf_key for hf_key in _CONFIG_KEYS.values() if hf_key not in values]
    if missing:
        raise UserError(f"{where}: config.json lacks {missing[0]}")
    try:
        return ModelConfig(**{ours: values[hf_key] for ours, hf_key in _CONFIG_KEYS.items()})
    except ValidationError as exc:
        raise UserError(f"{where}: config.json: {format_validation_error(exc)}") from None


def special_token_ids(tokenizer_dir: str | Path) -> dict[str, int | None]:
    """bos/eos/pad ids named by tokenizer_config.json, looked up in tokenizer.json."""
    tokenizer_dir = Path(tokenizer_dir)
    ids: dict[str, int | None] = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    try:
        tok_cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        tok = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return ids
    vocab = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    vocab.update((tok.get("model") or {}).get("vocab") or {})
    for kind in ("bos", "eos", "pad"):
        token = tok_cfg.get(f"{kind}_token")
        if isinstance(token, dict):  # older AddedToken serialisation
            token = token.get("content")
        if isinstance(token, str) and token in vocab:
            ids[f"{kind}_token_id"] = vocab[token]
    return ids


def export_hf(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    chat: bool = False,
) -> Path:
    """Write config.json, generation_config.json, model.safetensors, model_config.json
    and (from tokenizer_dir) the tokenizer files into out_dir, replacing it atomically.
    Token ids not given are taken from the tokenizer's files when it is given.

    chat=True (a chat model, e.g. after SFT): its turns end with <|im_end|>, so that is
    the tokenizer's and the model's eos, and generate() stops at it or <|endoftext|>."""
    out_dir = Path(out_dir)
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    tensors = to_hf_state_dict(sd, cfg, dtype)

    ids = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir)
        if not (tokenizer_dir / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {tokenizer_dir}")
        for key, value in special_token_ids(tokenizer_dir).items():
            if ids[key] is None:
                ids[key] = value

    stop_ids = None
    if chat:
        if tokenizer_dir is None:
            raise ValueError("a chat export needs the tokenizer")
        vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
        specials = {t["content"]: t["id"] for t in vocab.get("added_tokens", [])}
        if IM_END not in specials:
            raise ValueError(f"the tokenizer in {tokenizer_dir} has no {IM_END} token")
        ids["eos_token_id"] = specials[IM_END]
        stop_ids = [specials[t] for t in (IM_END, ENDOFTEXT) if t in specials]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", hf_config(cfg, dtype, **ids))
        gen = {"_from_model_config": True, **{k: v for k, v in ids.items() if v is not None}}
        if stop_ids:
            gen["eos_token_id"] = stop_ids
        _write_json(tmp / "generation_config.json", gen)
        cfg.save(tmp)
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
        if chat:
            _set_eos_token(tmp, IM_END)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _set_eos_token(folder: Path, token: str) -> None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            data["eos_token"] = token
            _write_json(path, data)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _replace_dir(src: Path, dst: Path) -> None:
    """rename(2) cannot replace a non-empty directory: move the old one aside first."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
