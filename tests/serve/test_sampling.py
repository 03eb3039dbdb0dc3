"""Batched sampling (serve/sampling.py): the tokens drawn follow the distribution asked
for (temperature, top-k, top-p), a row's draw depends only on its own logits, params
and random number, and the repetition penalty always lowers a seen token."""

from __future__ import annotations

import random

import pytest
import torch

from serve.sampling import SamplingParams, apply_repetition_penalty, sample

N = 20000  # draws per check: a frequency's standard error is at most 0.0036


def frequencies(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    rng = random.Random(0)
    rows = logits.expand(N, -1)
    tokens = sample(rows, [params] * N, [rng.random() for _ in range(N)])
    return torch.bincount(tokens, minlength=logits.shape[-1]).float() / N


@pytest.fixture(scope="module")
def logits() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(1, 40) * 2


def test_temperature_draws_follow_the_softmax(logits):
    want = torch.softmax(logits[0] / 0.7, -1)
    got = frequencies(logits, SamplingParams(temperature=0.7))
    assert (got - want).abs().max() < 0.015


def test_top_k_draws_only_the_k_most_likely_renormalised(logits):
    top = logits[0].topk(5).indices
    want = torch.zeros(40)
    want[top] = torch.softmax(logits[0, top], -1)
    got = frequencies(logits, SamplingParams(temperature=1.0, top_k=5))
    assert set(got.nonzero()[:, 0].tolist()) <= set(top.tolist())
    assert (got - want).abs().max() < 0.015


def test_top_p_draws_from_the_smallest_prefix_reaching_p(logits):
    probs = torch.softmax(logits[0], -1)
    ordered, order = probs.sort(descending=True)
    n = int((ordered.cumsum(0) < 0.6).sum()) + 1  # the prefix whose mass first reaches 0.6
    want = torch.zeros(40)
    want[order[:n]] = ordered[:n] / ordered[:n].sum()
    got = frequencies(logits, SamplingParams(temperature=1.0, top_p=0.6))
    assert set(got.nonzero()[:, 0].tolist()) == set(order[:n].tolist())
    assert (got - want).abs().max() < 0.015


@pytest.mark.parametrize("params", [SamplingParams(top_k=1), SamplingParams(top_p=1e-6)])
def test_cuts_to_one_token_are_greedy(logits, params):
    rows = torch.randn(64, 40)
    got = sample(rows, [params] * 64, [random.Random(i).random() for i in range(64)])
    assert got.tolist() == rows.argmax(-1).tolist()


def test_a_rows_draw_does_not_depend_on_the_rest_of_the_batch():
    torch.manual_seed(1)
    rows = torch.randn(6, 300)
    params = [SamplingParams(temperature=0.8), SamplingParams(top_k=20), SamplingParams(top_p=0.9),
              SamplingParams(temperature=1.3, top_k=50, top_p=0.95), SamplingParams(), SamplingParams(top_k=3)]
    us = [0.1, 0.5, 0.9, 0.33, 0.999, 0.0]
    together = sample(rows, params, us).tolist()
    alone = [sample(rows[i:i + 1], [params[i]], [us[i]]).item() for i in range(6)]
    assert together == alone


def test_repetition_penalty_lowers_seen_tokens_of_either_sign():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1]), 2.0)
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0]
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0]  # the model's own logits are left alone


def test_cpu_shortlist_draws_what_a_full_sort_draws(monkeypatch):
    """On CPU a large vocabulary is cut from its 256 most likely tokens unless a
    nucleus is wider: the tokens drawn must be those of the full sort."""
    import serve.sampling as sampling

    torch.manual_seed(2)
    V = 5000
    peaked, flat = torch.randn(400, V) * 6, torch.randn(40, V) * 0.05  # narrow and very wide nuclei
    shelf = torch.randn(400, V) * 0.01
    shelf[:, :200] += 6  # the 256 most likely hold ~94% of the mass: a 0.9 nucleus fits, barely
    params = [SamplingParams(top_p=0.9), SamplingParams(top_k=10), SamplingParams(top_k=300, top_p=0.5),
              SamplingParams(temperature=0.7), SamplingParams(top_p=0.99)]
    rng = random.Random(3)
    for logits in (peaked, flat, shelf):
        ps = [params[i % len(params)] for i in range(len(logits))]
        us = [rng.random() for _ in ps]
        fast = sample(logits, ps, us)
        monkeypatch.setattr(sampling, "_most_likely", lambda probs, *_: probs.sort(dim=-1, descending=True))
        assert fast.tolist() == sample(logits, ps, us).tolist()
        monkeypatch.undo()
