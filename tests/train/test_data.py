"""The trainer's reader over packed tokens: windows, epochs, rank sharding, mixture."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from train.data import BLOCK, PackedSplit, WindowSampler, eval_windows
from zerolm.errors import UserError

SEQ = 64


@pytest.fixture(scope="module")
def train_split(tokens_dir):
    return PackedSplit(tokens_dir, "train")


def test_epoch_covers_every_window_once_across_ranks(train_split):
    world = 3
    samplers = [WindowSampler(train_split, SEQ, seed=7, rank=r, world_size=world) for r in range(world)]
    n = samplers[0].epoch_samples
    assert n == sum((s.n_tokens - 1) // SEQ for s in train_split.sources.values())
    seen = []
    for k in range(-(-n // world)):
        for r, sampler in enumerate(samplers):
            g = k * world + r
            if g < n:
                seen.append(sampler.locate(g))
    assert len(seen) == n and len(set(seen)) == n  # no window lost, none twice
    # windows tile each source: every token but the tail is a target exactly once
    for name, src in train_split.sources.items():
        idx = sorted(w for s, w in seen if s == name)
        assert idx == list(range(src.n_windows(SEQ)))
        assert src.n_tokens - 1 - len(idx) * SEQ < SEQ


def test_windows_are_the_raw_tokens_and_deterministic(train_split, tokens_dir):
    a = WindowSampler(train_split, SEQ, seed=1, rank=1, world_size=2)
    b = WindowSampler(PackedSplit(tokens_dir, "train"), SEQ, seed=1, rank=1, world_size=2)
    batch = a.batch(5, 4)
    assert batch.shape == (4, SEQ + 1) and batch.dtype == np.int64
    assert np.array_equal(batch, b.batch(5, 4))  # a fresh reader resumes at k=5 exactly
    name, w = a.locate((5 * 2) + 1)
    src = train_split.sources[name]
    assert np.array_equal(batch[0], src.read(w * SEQ, SEQ + 1))
    assert not np.array_equal(batch, WindowSampler(train_split, SEQ, seed=2, rank=1, world_size=2).batch(5, 4))
    assert batch.max() < train_split.vocab_size


def test_reads_across_shard_boundaries(train_split):
    src = next(iter(train_split.sources.values()))
    whole = np.concatenate([np.asarray(a, dtype=np.int64) for a in src.arrays])
    for start in (0, 17, src.n_tokens - 100):
        assert np.array_equal(src.read(start, 100), whole[start:start + 100])
    with pytest.raises(IndexError):
        src.read(src.n_tokens - 5, 10)


def test_mixture_weights_and_no_repeat_within_a_source_epoch(train_split):
    mixture = [{"name": "m", "weights": {"wiki": 6, "c4": 3, "news": 1}}]
    s = WindowSampler(train_split, SEQ, seed=3, mixture=mixture)
    draws = [s.locate(g) for g in range(20 * BLOCK)]
    freq = Counter(name for name, _ in draws)
    assert set(freq) == {"wiki", "c4", "news"}
    for name, want in (("wiki", 0.6), ("c4", 0.3), ("news", 0.1)):
        assert abs(freq[name] / len(draws) - want) < 0.02
    for name in ("wiki", "c4"):
        windows = [w for n, w in draws if n == name]
        n_win = train_split.sources[name].n_windows(SEQ)
        first_epoch = windows[:n_win]
        assert len(set(first_epoch)) == len(first_epoch)  # a source repeats only after its epoch


def test_mixture_stages_switch_weights(train_split):
    total = 8 * BLOCK
    mixture = [{"name": "general", "fraction": 0.5, "weights": {"peoples_daily": 1}},
               {"name": "anneal", "fraction": 0.5, "weights": {"cmrc": 1}}]
    s = WindowSampler(train_split, SEQ, seed=0, mixture=mixture, total_samples=total)
    assert {s.locate(g)[0] for g in range(0, total // 2)} == {"peoples_daily"}
    assert {s.locate(g)[0] for g in range(total // 2, total)} == {"cmrc"}
    # resuming mid-run needs no state: a fresh sampler gives the same sample
    assert WindowSampler(train_split, SEQ, seed=0, mixture=mixture, total_samples=total).locate(total - 1) == \
        s.locate(total - 1)


def test_eval_windows_split_across_ranks(tokens_dir):
    val = PackedSplit(tokens_dir, "val")
    src = val.sources["peoples_daily"]
    all_w = list(eval_windows(src, SEQ, 10))
    r0, r1 = list(eval_windows(src, SEQ, 10, 0, 2)), list(eval_windows(src, SEQ, 10, 1, 2))
    assert len(all_w) == len(r0) + len(r1) and np.array_equal(all_w[1], r1[0])


def test_errors(tokens_dir, tmp_path, train_split):
    with pytest.raises(UserError, match="no source"):
        PackedSplit(tokens_dir, "train", sources=["nosuch"])
    with pytest.raises(UserError, match="no _SUCCESS|does not exist"):
        PackedSplit(tmp_path, "train")
    with pytest.raises(UserError, match="nothing to train on"):
        WindowSampler(train_split, 10**9)
    with pytest.raises(UserError, match="no training tokens"):
        WindowSampler(train_split, SEQ, mixture=[{"name": "x", "weights": {"nosuch": 1}}])
