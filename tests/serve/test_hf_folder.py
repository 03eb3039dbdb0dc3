"""`zerolm serve` (and `--init`) load a plain Llama folder that transformers saved, not
only our own exports: tied embeddings, grouped-query attention, sharded safetensors.
What our Transformer cannot compute exactly is refused with a one-line error naming the
config.json field, before any weight is read."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from serve.engine import Engine, Request
from serve.loading import load_model
from serve.sampling import SamplingParams
from zerolm.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def save_hf_llama(tiny_model_dir, out, *, tied: bool, shard: bool, **config_overrides):
    """A random LlamaForCausalLM saved by transformers, with the tiny model's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = json.loads((tiny_model_dir / "hf" / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tied, rms_norm_eps=1e-5, **config_overrides)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random init leaves norms at 1 and logits flat: make greedy decisive
        for p in model.parameters():
            p.mul_(4.0)
    model.save_pretrained(out, max_shard_size="200KB" if shard else "1GB")
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_model_dir / "hf" / name, out / name)
    return model


@pytest.mark.parametrize("tied,shard", [(True, True), (False, False)], ids=["tied-sharded", "untied"])
def test_a_transformers_llama_folder_decodes_as_transformers_does(tiny_model_dir, tmp_path, tied, shard):
    hf = save_hf_llama(tiny_model_dir, tmp_path, tied=tied, shard=shard)
    assert (tmp_path / "model.safetensors.index.json").is_file() == shard
    engine = Engine(load_model("hf", tmp_path, device="cpu"))
    assert engine.m.config.tie_embeddings == tied and engine.m.config.kv_heads == 2
    prompts = [engine.encode(t) for t in ("中华人民共和国成立于", "The quick brown fox", "北京")]
    # valid_utf8=False: the raw model's greedy tokens, which is what transformers decodes
    results = engine.generate([Request(p, SamplingParams(max_tokens=12, temperature=0.0, valid_utf8=False))
                               for p in prompts])
    with torch.no_grad():
        for p, res in zip(prompts, results):
            want = hf.generate(torch.tensor(p)[None], max_new_tokens=12, do_sample=False, pad_token_id=0,
                               eos_token_id=None)
            assert res.output_ids == want[0, len(p):].tolist()
            logits = engine.m.model(torch.tensor(p)[None])[0, -1]
            assert (logits - hf(torch.tensor(p)[None]).logits[0, -1]).abs().max().item() < 1e-4


@pytest.mark.parametrize("edit,field", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 128}}, "rope_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "mistral"}, "model_type"),
    ({"head_dim": 32}, "head_dim"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ({"num_hidden_layers": None}, "num_hidden_layers"),
])
def test_what_the_model_cannot_compute_is_refused_by_name(tiny_model_dir, tmp_path, edit, field):
    save_hf_llama(tiny_model_dir, tmp_path, tied=True, shard=False)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(edit)
    cfg.pop("rope_parameters", None) if "rope_scaling" in edit else None  # transformers 5 keeps both forms
    if edit.get("num_hidden_layers", 0) is None:
        cfg.pop("num_hidden_layers")
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=field):
        load_model("hf", tmp_path, device="cpu")


def test_serve_refuses_an_unsupported_folder_in_one_line(tiny_model_dir, tmp_path):
    save_hf_llama(tiny_model_dir, tmp_path, tied=True, shard=False)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    proc = subprocess.run([sys.executable, "-m", "zerolm.cli", "serve", "--model", f"x={tmp_path}",
                           "--port", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "hidden_act" in proc.stderr, proc.stderr
