"""export_hf: the folder loads as LlamaForCausalLM (no remote code) with the same logits."""

import json

import pytest
import torch
from safetensors.torch import load_file

from train.export_hf import export_hf, from_hf_state_dict, to_hf_state_dict
from train.model import Transformer
from train.model_config import ModelConfig

transformers = pytest.importorskip("transformers")


def make(seed=0, **kw):
    base = dict(vocab_size=211, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=48,
                rope_theta=10000.0, norm_eps=1e-5)
    cfg = ModelConfig(**{**base, **kw})
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    # Non-trivial norm weights, so a swapped input/post-attention norm would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return cfg, model


def load_hf(out_dir):
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and not info["error_msgs"]
    return hf.eval()


def max_logit_diff(model, hf, vocab, seq=40):
    torch.manual_seed(1)
    x = torch.randint(0, vocab, (2, seq))
    with torch.no_grad():
        return (hf(x).logits.float() - model(x).float()).abs().max().item()


@pytest.mark.parametrize(
    "kw",
    [
        dict(tie_embeddings=False, n_kv_heads=2),  # GQA, untied
        dict(tie_embeddings=True, n_kv_heads=2),  # GQA, tied
        dict(tie_embeddings=False, n_kv_heads=4),  # MHA
        dict(tie_embeddings=True, n_kv_heads=1, rope_theta=5e5, ffn_hidden=96),  # MQA
        dict(bias=True, norm_eps=1e-6),
    ],
    ids=["gqa-untied", "gqa-tied", "mha-untied", "mqa-tied-theta", "bias"],
)
def test_hf_logits_match(tmp_path, kw):
    cfg, model = make(**kw)
    if cfg.bias:  # zero-initialised; make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    out = export_hf(model, cfg, tmp_path / "hf")
    hf = load_hf(out)
    assert hf.config.tie_word_embeddings == cfg.tie_embeddings
    assert max_logit_diff(model, hf, cfg.vocab_size) < 1e-4
    names = load_file(out / "model.safetensors").keys()
    assert ("lm_head.weight" in names) != cfg.tie_embeddings
    assert ModelConfig.load(out) == cfg


def test_state_dict_with_deepspeed_prefix_and_bf16(tmp_path):
    cfg, model = make()
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    out = export_hf(sd, cfg, tmp_path / "hf", dtype=torch.bfloat16)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    tensors = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    hf = load_hf(out).float()
    assert max_logit_diff(model, hf, cfg.vocab_size) < 0.05  # bf16 weight rounding only


def test_mismatched_state_dict_is_rejected(tmp_path):
    cfg, model = make()
    sd = model.state_dict()
    del sd["layers.1.feed_forward.w2.weight"]
    with pytest.raises(ValueError, match="missing"):
        export_hf(sd, cfg, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert list(tmp_path.iterdir()) == []  # no temp dir left behind


def test_roundtrip_names():
    cfg, model = make(tie_embeddings=False)
    back = from_hf_state_dict(to_hf_state_dict(model.state_dict(), cfg))
    fresh = Transformer(cfg)
    fresh.load_state_dict(back)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v)


def test_a_missing_projection_of_a_fused_group_is_a_clear_error(tmp_path):
    """q/k/v and gate/up are joined into wqkv / w13 on loading: an HF folder missing one
    of them names it, and loading it is a one-line error, not a shape mismatch."""
    from safetensors.torch import save_file

    from train.weights import load_transformer
    from zerolm.errors import UserError

    cfg, model = make()
    hf_sd = to_hf_state_dict(model.state_dict(), cfg)
    del hf_sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match="model.layers.1: no mlp.up_proj.weight"):
        from_hf_state_dict(hf_sd)
    out = export_hf(model.state_dict(), cfg, tmp_path / "hf")
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="do not match a Llama model .*self_attn.k_proj"):
        load_transformer(out, cfg)


def test_overwrite_is_atomic_and_copies_tokenizer(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["hello world 你好世界"] * 20, trainer)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>",
        "eos_token": "<|eos|>", "pad_token": "<|pad|>", "model_max_length": 48,
    }))

    cfg, model = make(vocab_size=tok.get_vocab_size())
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("old export")
    export_hf(model, cfg, out, tokenizer_dir=tok_dir, eos_token_id=2)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "tok"]

    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.decode(hf_tok("hello 你好")["input_ids"]) == "hello 你好"
    assert hf_tok.eos_token_id == 2
    hf = load_hf(out)
    assert max_logit_diff(model, hf, cfg.vocab_size) < 1e-4
