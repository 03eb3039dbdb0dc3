"""Preference losses against trl's own implementations on identical tensors: trl's
trainer methods are called unbound, with the few trainer attributes they read and a
stand-in model whose outputs are the given log-probs / rewards. Plus the formulas,
gradients and the chunked per-token log-probs."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from train.losses import IGNORE_INDEX, dpo_loss, reward_pair_loss, sequence_sums, token_logprobs

P, L = 6, 9  # pairs, sequence length


def _metrics_sink():
    return defaultdict(lambda: defaultdict(list))


def _accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


def _pair_tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, L, (2 * P,), generator=g)  # answer tokens per sequence (chosen rows first)
    mask = (torch.arange(L)[None, :] >= L - lengths[:, None]).long()  # answer at the end of each row
    per_token = -torch.rand(2 * P, L - 1, generator=g, dtype=torch.float64) * 3 * mask[:, 1:]
    ref = -torch.rand(2 * P, generator=g, dtype=torch.float64) * 10 - 5
    return per_token, mask, ref


def trl_dpo_loss(loss_type: str, beta: float, label_smoothing: float, per_token, mask, ref) -> torch.Tensor:
    """trl.DPOTrainer._compute_loss on given per-token log-probs (its precomputed-
    reference path), rows ordered [chosen..., rejected...] as trl's batches are."""
    from trl import DPOTrainer

    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                              mean_logits=torch.zeros_like(per_token), is_top1=torch.zeros_like(per_token).bool())
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_accelerator(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, use_weighting=False, _metrics=_metrics_sink(),
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * P, L, dtype=torch.long), "attention_mask": torch.ones(2 * P, L),
              "completion_mask": mask, "ref_chosen_logps": ref[:P], "ref_rejected_logps": ref[P:]}
    return DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, return_outputs=False)


def ours(loss_type: str, beta: float, label_smoothing: float, per_token, mask, ref):
    lp, tokens = per_token.sum(1), mask[:, 1:].sum(1).double()
    losses, rc, rr = dpo_loss(lp[:P], lp[P:], ref[:P], ref[P:], beta=beta, kind=loss_type,
                              label_smoothing=label_smoothing, chosen_tokens=tokens[:P], rejected_tokens=tokens[P:])
    return losses, rc, rr


@pytest.mark.parametrize("loss_type, beta, eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("ipo", 0.1, 0.0),
                                                  ("robust", 0.2, 0.1)])
def test_dpo_losses_equal_trl(loss_type, beta, eps):
    per_token, mask, ref = _pair_tensors()
    losses, rc, rr = ours(loss_type, beta, eps, per_token, mask, ref)
    torch.testing.assert_close(losses.mean(), trl_dpo_loss(loss_type, beta, eps, per_token, mask, ref),
                               rtol=1e-10, atol=1e-12)
    lp = per_token.sum(1)
    torch.testing.assert_close(rc, beta * (lp[:P] - ref[:P]))


def _cpo(loss_type: str, beta: float, eps: float, gamma: float = 0.5):
    return SimpleNamespace(alpha=0.0, simpo_gamma=gamma, beta=beta, label_smoothing=eps, loss_type=loss_type,
                           accelerator=_accelerator())


def test_cdpo_equals_trl_label_smoothed_sigmoid():
    """cDPO is trl's label-smoothed sigmoid loss (CPO's, on log ratios)."""
    from trl.experimental.cpo import CPOTrainer

    per_token, mask, ref = _pair_tensors(1)
    lp = per_token.sum(1)
    losses, _, _ = ours("cdpo", 0.3, 0.2, per_token, mask, ref)
    theirs, _, _ = CPOTrainer.cpo_loss(_cpo("sigmoid", 0.3, 0.2), lp[:P] - ref[:P], lp[P:] - ref[P:])
    torch.testing.assert_close(losses, theirs)
    plain, _, _ = ours("sigmoid", 0.3, 0.0, per_token, mask, ref)
    assert not torch.allclose(losses, plain)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_equals_trl(eps):
    from trl.experimental.cpo import CPOTrainer

    per_token, mask, _ = _pair_tensors(2)
    tokens = mask[:, 1:].sum(1).double()
    avg = per_token.sum(1) / tokens  # trl's SimPO uses mean log-probs
    theirs, rc_t, _ = CPOTrainer.cpo_loss(_cpo("simpo", 2.0, eps, gamma=0.7), avg[:P], avg[P:])
    lp = per_token.sum(1)
    losses, rc, _ = dpo_loss(lp[:P], lp[P:], None, None, beta=2.0, kind="simpo", label_smoothing=eps,
                             chosen_tokens=tokens[:P], rejected_tokens=tokens[P:], simpo_gamma=0.7)
    # trl's beta * (d - gamma / beta) is ours beta * d - gamma
    torch.testing.assert_close(losses, theirs)
    torch.testing.assert_close(rc, rc_t)


@pytest.mark.parametrize("margin, center", [(False, None), (True, None), (True, 0.01)])
def test_reward_loss_equals_trl(margin, center):
    from trl import RewardTrainer

    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(2 * P, 1, generator=g, dtype=torch.float64)
    inputs = {"attention_mask": torch.ones(2 * P, 4)}
    m = torch.rand(P, generator=g, dtype=torch.float64) if margin else None
    if margin:
        inputs["margin"] = m
    trainer = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=_accelerator(),
                              args=SimpleNamespace(center_rewards_coefficient=center), _metrics=_metrics_sink(),
                              _total_train_tokens=0, _tp_size=1)
    theirs = RewardTrainer.compute_loss(trainer, lambda **kw: SimpleNamespace(logits=rewards), dict(inputs))
    per_pair = reward_pair_loss(rewards[:P, 0], rewards[P:, 0], m, center=center or 0.0)
    torch.testing.assert_close(per_pair.mean(), theirs)


def test_losses_are_finite_at_extremes():
    big = torch.tensor([1e4, -1e4, 0.0], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(3, dtype=torch.float64)
    for kind in ("sigmoid", "cdpo", "robust"):
        losses, _, _ = dpo_loss(big, zero, zero, zero, beta=0.5, kind=kind, label_smoothing=0.1 if kind != "sigmoid" else 0.0)
        losses.sum().backward()
        assert torch.isfinite(losses).all() and torch.isfinite(big.grad).all()
        big.grad = None
    assert torch.isfinite(reward_pair_loss(big, -big)).all()


def test_token_logprobs_under_bf16_autocast_stay_close_and_give_fp32_grads():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(40, 32, generator=g, requires_grad=True)
    w = torch.randn(300, 32, generator=g, requires_grad=True)
    t = torch.randint(0, 300, (40,), generator=g)
    ref = F.log_softmax(h @ w.t(), dim=-1).gather(1, t[:, None])[:, 0]
    for chunk in (16, 1024):
        with torch.autocast("cpu", torch.bfloat16):
            lp = token_logprobs(h, w, t, chunk=chunk)
        assert lp.dtype == torch.float32
        torch.testing.assert_close(lp, ref.detach(), rtol=0.05, atol=0.3)  # bf16 matmul rounding
        gh, gw = torch.autograd.grad(lp.sum(), (h, w))
        rh, rw = torch.autograd.grad(ref.sum(), (h, w), retain_graph=True)
        assert gh.dtype == gw.dtype == torch.float32
        assert F.cosine_similarity(gh.flatten(), rh.flatten(), dim=0) > 0.99
        assert F.cosine_similarity(gw.flatten(), rw.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("chunk", [7, 1024])  # softmax recomputed in backward / kept from forward
def test_token_logprobs_match_log_softmax_in_value_and_gradient(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(23, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (23,), generator=g)
    t[[0, 5, 22]] = IGNORE_INDEX
    ours_lp = token_logprobs(h, w, t, chunk=chunk)
    ref = F.log_softmax(h @ w.t(), dim=-1).gather(1, t.clamp(min=0)[:, None])[:, 0].masked_fill(t == IGNORE_INDEX, 0)
    torch.testing.assert_close(ours_lp.double(), ref.float().double(), rtol=1e-6, atol=1e-6)
    gh, gw = torch.autograd.grad((ours_lp * torch.arange(23.0, dtype=torch.float32)).sum(), (h, w))
    rh, rw = torch.autograd.grad((ref * torch.arange(23.0, dtype=torch.float64)).sum(), (h, w))
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(token_logprobs(h, w, t, chunk=chunk), ours_lp.detach())
    none = torch.full_like(t, IGNORE_INDEX)  # nothing to score: zeros, and a graph that backpropagates zeros
    lp0 = token_logprobs(h, w, none, chunk=chunk)
    assert lp0.abs().sum().item() == 0
    assert torch.autograd.grad(lp0.sum(), h)[0].abs().sum().item() == 0
    seq = torch.tensor([[0, 0, 1, 1, -1], [2, 2, 2, -1, -1]])
    vals = torch.arange(10.0).view(2, 5)
    assert sequence_sums(vals, seq, 3).tolist() == [1.0, 5.0, 18.0]
