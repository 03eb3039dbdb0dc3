"""Losses against reference formulas: the fused chunked linear cross-entropy equals
F.cross_entropy on materialised logits, in value and in gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from train.losses import IGNORE_INDEX, cross_entropy, linear_cross_entropy


def reference(hidden, weight, targets, mask=None):
    t = targets.masked_fill(mask == 0, IGNORE_INDEX) if mask is not None else targets
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_linear_cross_entropy_matches_reference(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 11, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (3, 11), generator=g)
    t[0, :4] = IGNORE_INDEX
    mask = torch.ones(3, 11)
    mask[2, 5:] = 0
    ours = linear_cross_entropy(h, w, t, mask, chunk=chunk)
    gh, gw = torch.autograd.grad(ours * 2.5, (h, w))
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = reference(h2, w2, t, mask)
    rh, rw = torch.autograd.grad(ref * 2.5, (h2, w2))
    torch.testing.assert_close(ours.double(), ref.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-6)


def test_all_ignored_gives_zero_not_nan():
    h = torch.randn(2, 3, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    t = torch.full((2, 3), IGNORE_INDEX)
    loss = linear_cross_entropy(h, w, t)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(h.grad == 0) and torch.all(w.grad == 0)
    assert cross_entropy(h @ w.t(), t).item() == 0.0


def test_no_grad_and_tied_weights():
    emb = torch.nn.Embedding(30, 8)
    ids = torch.randint(0, 30, (2, 5))
    h = emb(ids)
    with torch.no_grad():
        a = linear_cross_entropy(h, emb.weight, ids)
    b = reference(h, emb.weight, ids)
    torch.testing.assert_close(a, b)
    # tied: the head weight is the embedding, its gradient accumulates both uses
    loss = linear_cross_entropy(emb(ids), emb.weight, ids)
    loss.backward()
    g1 = emb.weight.grad.clone()
    emb.weight.grad = None
    reference(emb(ids), emb.weight, ids).backward()
    torch.testing.assert_close(g1, emb.weight.grad, rtol=1e-4, atol=1e-6)
