"""ModelConfig validation/presets/persistence and Transformer init, loss, checkpointing."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from train.model import Transformer, apply_rope, cross_entropy
from train.model_config import PRESETS, ModelConfig, from_preset
from zerolm.errors import UserError


def small_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    return ModelConfig(**{**base, **kw})


# ---- ModelConfig ---------------------------------------------------------------------

def test_config_save_load_roundtrip(tmp_path):
    cfg = small_cfg(rope_theta=5e5, tie_embeddings=True, ffn_dim_multiplier=1.3)
    path = cfg.save(tmp_path)
    assert path.name == "model_config.json"
    assert ModelConfig.load(tmp_path) == cfg
    assert ModelConfig.load(path) == cfg
    assert json.loads(path.read_text())["n_kv_heads"] == 2


def test_config_unknown_key_is_an_error(tmp_path):
    with pytest.raises(ValidationError, match="n_layer"):
        ModelConfig(vocab_size=10, dim=64, n_layer=2, n_layers=2, n_heads=4, max_seq_len=8)
    data = small_cfg().model_dump()
    data["hidden"] = 3
    (tmp_path / "model_config.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="hidden: unknown key"):
        ModelConfig.load(tmp_path)
    with pytest.raises(UserError, match="not found"):
        ModelConfig.load(tmp_path / "nope")


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(n_kv_heads=3), "must divide n_heads"),
        (dict(dim=66), "divisible by n_heads"),
        (dict(dim=12, n_heads=4, n_kv_heads=4), "must be even"),
        (dict(n_kv_heads=0), "greater than 0"),
        (dict(dropout=1.0), "less than 1"),
    ],
)
def test_config_bad_shapes(kw, msg):
    with pytest.raises(ValidationError, match=msg):
        small_cfg(**kw)


def test_config_defaults_and_ffn_rule():
    cfg = ModelConfig(vocab_size=10, dim=256, n_layers=1, n_heads=4, max_seq_len=8)
    assert cfg.n_kv_heads == 4 and cfg.head_dim == 64
    assert cfg.ffn_dim == 768  # int(2*4*256/3) = 682 -> next multiple of 256
    assert cfg.model_copy(update={"ffn_dim_multiplier": 1.5}).ffn_dim == 1024  # 1023 -> 1024
    assert cfg.model_copy(update={"multiple_of": 64}).ffn_dim == 704
    assert cfg.model_copy(update={"ffn_hidden": 100}).ffn_dim == 100
    # Llama-2 7B: dim 4096 -> 11008
    assert ModelConfig(vocab_size=10, dim=4096, n_layers=1, n_heads=32, max_seq_len=8).ffn_dim == 11008


def test_presets_param_counts():
    assert from_preset("125m").num_params() == 124_668_672  # 124.7M, untied
    assert from_preset("125m", tie_embeddings=True).num_params() == 100_092_672
    assert from_preset("tiny").num_params(exclude_embeddings=True) == 3_148_032
    assert 24e6 < from_preset("25m").num_params() < 26e6
    assert 340e6 < from_preset("350m").num_params() < 360e6
    for name in PRESETS:
        cfg = from_preset(name, vocab_size=1000)
        assert cfg.vocab_size == 1000


def test_num_params_matches_module():
    for kw in (dict(), dict(tie_embeddings=True), dict(bias=True), dict(n_kv_heads=1)):
        cfg = small_cfg(**kw)
        model = Transformer(cfg)
        assert cfg.num_params() == sum(p.numel() for p in model.parameters())
        assert cfg.num_params(exclude_embeddings=True) == cfg.num_params() - cfg.vocab_size * cfg.dim


def test_flops_per_token():
    cfg = from_preset("125m")
    n = cfg.num_params() - cfg.vocab_size * cfg.dim
    assert cfg.flops_per_token(1024) == 6 * n + 12 * 12 * 768 * 1024
    tied = from_preset("125m", tie_embeddings=True)
    assert tied.flops_per_token(1024) == cfg.flops_per_token(1024)  # same matmuls


def test_unknown_preset():
    with pytest.raises(UserError, match="tiny, 25m, 125m, 350m"):
        from_preset("7b")
    with pytest.raises(UserError, match="n_kv_heads"):
        from_preset("tiny", n_kv_heads=3)


# ---- Transformer ---------------------------------------------------------------------

def test_init_statistics():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, dim=256, n_layers=8, n_heads=4, max_seq_len=16, bias=True)
    model = Transformer(cfg)
    resid = 0.02 / math.sqrt(2 * cfg.n_layers)
    for layer in model.layers:
        for w in (layer.attention.wo.weight, layer.feed_forward.w2.weight):
            assert w.std().item() == pytest.approx(resid, rel=0.05)
        for w in (layer.attention.wqkv.weight, layer.feed_forward.w13.weight):
            assert w.std().item() == pytest.approx(0.02, rel=0.05)
        assert torch.all(layer.attention.wqkv.bias == 0) and torch.all(layer.feed_forward.w2.bias == 0)
        assert torch.all(layer.attention_norm.weight == 1)
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.output.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert abs(model.output.weight.mean().item()) < 1e-3


def test_buffers_are_not_saved_and_tied_weights_share():
    model = Transformer(small_cfg(tie_embeddings=True))
    assert model.output.weight is model.tok_embeddings.weight
    assert not any("rope" in k for k in model.state_dict())


def test_rope_is_a_rotation_of_halves():
    # Element i pairs with i + D/2 (HF layout): norms of each pair are preserved.
    x = torch.randn(1, 1, 5, 8)
    model = Transformer(small_cfg(dim=32, n_heads=4))
    cos = model.rope_cos[:5]
    y = apply_rope(x, model.rope_cos[:5], model.rope_sin[:5])
    pair_norm = lambda t: t[..., :4] ** 2 + t[..., 4:] ** 2
    torch.testing.assert_close(pair_norm(y), pair_norm(x))
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # position 0 is unrotated
    assert cos.shape == (5, 8)
    # bit-identical to HF's rotate_half form with the plain sin table
    sin = torch.cat((-model.rope_sin[:5, :4], model.rope_sin[:5, 4:]), dim=-1)
    assert torch.equal(y, x * cos + torch.cat((-x[..., 4:], x[..., :4]), dim=-1) * sin)


def test_causality():
    torch.manual_seed(0)
    model = Transformer(small_cfg()).eval()
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, :10], model(y)[:, :10])
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_loss_matches_reference_cross_entropy():
    torch.manual_seed(0)
    model = Transformer(small_cfg()).eval()
    x = torch.randint(0, 97, (3, 16))
    targets = torch.randint(0, 97, (3, 16))
    targets[0, :5] = -100
    logits = model(x)
    assert logits.shape == (3, 16, 97)
    ref = F.cross_entropy(logits.float().view(-1, 97), targets.view(-1), ignore_index=-100)
    for fused in (True, False):  # chunked loss fused with the head, and the plain one
        model.fused_loss = fused
        out, loss = model(x, targets)
        assert (out is None) == fused
        torch.testing.assert_close(loss, ref)

    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, 8:] = 0
    _, masked = model(x, targets, loss_mask=mask)
    ref_t = targets.clone()
    ref_t[1, 8:] = -100
    torch.testing.assert_close(masked, F.cross_entropy(logits.view(-1, 97), ref_t.view(-1)))

    # Nothing to learn from: zero loss with a graph, not NaN.
    empty = cross_entropy(logits, torch.full_like(targets, -100))
    assert empty.item() == 0.0 and empty.requires_grad


def test_loss_is_fp32_under_bf16():
    model = Transformer(small_cfg()).to(torch.bfloat16)
    x = torch.randint(0, 97, (2, 8))
    _, loss = model(x, x)
    assert loss.dtype == torch.float32
    model.fused_loss = False
    logits, loss = model(x, x)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32


def test_gradient_checkpointing_is_exact():
    torch.manual_seed(0)
    cfg = small_cfg(n_layers=3)
    a = Transformer(cfg)
    b = Transformer(cfg)
    b.load_state_dict(a.state_dict())
    b.gradient_checkpointing = True
    x = torch.randint(0, 97, (2, 24))
    la = a(x, x)[1]
    lb = b(x, x)[1]
    la.backward()
    lb.backward()
    assert la.item() == lb.item()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=0, atol=0, msg=name)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = Transformer(small_cfg(dropout=0.5))
    x = torch.randint(0, 97, (2, 8))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))
        model.train()
        assert not torch.allclose(model(x), model(x))


def test_meta_init_then_init_weights():
    cfg = small_cfg()
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    ref = Transformer(cfg)
    torch.testing.assert_close(model.rope_cos, ref.rope_cos)
    assert torch.isfinite(model(torch.randint(0, 97, (1, 8)))).all()
