"""The engine against the plain training model: the KV-cached, batched, left-padded
decode must produce what full forward passes produce, token for token."""

from __future__ import annotations

import pytest
import torch

from serve.engine import Engine, Request
from serve.kv import KVCache, forward_cached
from serve.loading import load_model
from serve.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine(load_model("tiny", tiny_model_dir, device="cpu"))


def greedy_by_full_forward(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor(ids)[None])[0, -1].argmax()))
    return ids[len(prompt):]


def prompts(engine, k: int) -> list[list[int]]:
    texts = ["中华人民共和国成立于", "The quick brown fox", "今天的新闻：北京", "In 1949, the", "上海", "A"]
    return [engine.encode(t) for t in texts[:k]]


def test_cached_decode_logits_equal_full_forward(engine):
    check_cached_decode(engine.m.model, prompts(engine, 3))  # different lengths: left padding


@pytest.mark.parametrize("overrides", [dict(bias=True, n_kv_heads=1, tie_embeddings=False),
                                       dict(n_heads=2, n_kv_heads=2)])
def test_cached_decode_other_shapes(overrides):
    """Biases (fused with their projections), one shared kv head, no GQA at all."""
    from train.model import Transformer
    from train.model_config import from_preset

    torch.manual_seed(0)
    cfg = from_preset("tiny", **{"vocab_size": 300, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                 "max_seq_len": 64, **overrides})
    model = Transformer(cfg).eval()
    with torch.no_grad():  # random biases, so a dropped one would show
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    check_cached_decode(model, [[5, 17, 42, 7, 99], [3, 250], [11, 12, 13]])


def check_cached_decode(model, ps: list[list[int]]) -> None:
    B, L = len(ps), max(map(len, ps))
    ids = torch.zeros(B, L + 4, dtype=torch.long)
    valid = torch.ones(B, L + 4, dtype=torch.bool)
    for i, p in enumerate(ps):
        ids[i, L - len(p):L] = torch.tensor(p)
        valid[i, :L - len(p)] = False
    pads = torch.tensor([L - len(p) for p in ps])
    cache = KVCache(model, B, L + 4)
    pos = (torch.arange(L)[None] - pads[:, None]).clamp(min=0)
    logits = forward_cached(model, cache, ids[:, :L], pos, valid)
    seqs = [list(p) for p in ps]
    for step in range(4):
        with torch.no_grad():
            for i, s in enumerate(seqs):
                full = model(torch.tensor(s)[None])[0, -1].float()
                torch.testing.assert_close(logits[i], full, rtol=1e-4, atol=1e-4)
        nxt = logits.argmax(-1)
        for i, s in enumerate(seqs):
            s.append(int(nxt[i]))
        logits = forward_cached(model, cache, nxt[:, None], (pos[:, -1:] + step + 1), valid)


def test_batched_generation_equals_full_forward_greedy(engine):
    ps = prompts(engine, 6)
    results = engine.generate([Request(p, SamplingParams(max_tokens=12, temperature=0)) for p in ps])
    for p, res in zip(ps, results):
        assert res.output_ids == greedy_by_full_forward(engine.m.model, p, 12)


def test_requests_joining_a_running_batch_decode_as_alone(engine):
    """Rows join a running batch and leave it at different steps; the oldest leaves
    first, so the slots only it used are cut: the cache spans the longest live row."""
    ps = prompts(engine, 4)
    ps[0] = ps[0] + ps[1] + ps[2]  # the oldest row is also the longest
    budgets = [4, 10, 8, 6]
    alone = [engine.generate([Request(p, SamplingParams(max_tokens=n, temperature=0))])[0].output_ids
             for p, n in zip(ps, budgets)]
    got: dict[int, list[int]] = {}
    cb = lambda i: (lambda res: got.__setitem__(i, res.output_ids))  # noqa: E731
    first = engine.prefill([Request(ps[0], SamplingParams(max_tokens=budgets[0], temperature=0))], [cb(0)])
    batch = engine.step(engine.step(first))  # two tokens in, the others arrive
    later = engine.prefill([Request(p, SamplingParams(max_tokens=n, temperature=0))
                            for p, n in zip(ps[1:], budgets[1:])], [cb(1), cb(2), cb(3)])
    batch = engine.join(batch, later)
    lengths = []
    while batch is not None:
        batch = engine.step(batch)
        if batch is not None:
            live = max(len(s.res.prompt_ids) + len(s.res.output_ids) for s in batch.seqs)
            assert batch.cache.length == live and min(batch.first_slot) == 0
            lengths.append(batch.cache.length)
    assert got == dict(enumerate(alone))
    assert lengths != sorted(lengths)  # the cache shrank when the oldest row left
