"""Cancelling requests in the batch loop (in this process: `Batcher`, as `zerolm serve
--engine-thread` runs it): a cancelled sequence leaves at the next step, and the
sequences that stay decode exactly what they decode alone."""

from __future__ import annotations

import threading
import time

import pytest

from serve.batching import Batcher
from serve.engine import Aborted, Engine, Request
from serve.loading import load_model
from serve.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine(load_model("tiny", tiny_model_dir, device="cpu"), max_batch=8)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, stop_ids=())


def test_a_dropped_row_leaves_the_others_decoding_as_alone(engine):
    prompts = [engine.encode(t) for t in ("中华人民共和国", "The quick brown fox", "今天的新闻", "In 1949")]
    alone = [engine.generate([Request(p, greedy(12))])[0].output_ids for p in prompts]
    results: dict[int, object] = {}
    requests = [Request(p, greedy(12)) for p in prompts]
    batch = engine.new_batch(rows=4, graphs=False)
    engine.prefill(batch, requests, [lambda res, i=i: results.__setitem__(i, res) for i in range(4)])
    for _ in range(3):
        engine.step(batch)
    requests[0].cancelled = requests[2].cancelled = True  # rows 0 and 2: the last row moves into one of them
    assert engine.drop_cancelled(batch) == 2 and len(batch) == 2
    while len(batch):
        engine.step(batch)
    assert isinstance(results[0], Aborted) and isinstance(results[2], Aborted)
    assert [results[1].output_ids, results[3].output_ids] == [alone[1], alone[3]]


def test_cancelling_a_future_stops_its_sequence_and_frees_the_loop(engine):
    steps = []
    batcher = Batcher(engine, on_batch=lambda n, secs: steps.append(n))
    first_text = threading.Event()
    long = Request(engine.encode("中华人民共和国"), greedy(200), on_text=lambda text: first_text.set())
    fut = batcher.submit(long)
    assert first_text.wait(60)
    assert fut.cancel() and fut.cancelled()
    deadline = time.time() + 60
    while time.time() < deadline:  # the loop goes idle: no step for 0.5 s
        before = len(steps)
        time.sleep(0.5)
        if len(steps) == before:
            break
    assert len(steps) < 100, f"{len(steps)} steps for a request cancelled after its first text"
    after = len(steps)
    short = batcher.submit(Request(engine.encode("上海"), greedy(5))).result(timeout=60)
    assert len(short.output_ids) == 5 and steps[after:] == [1] * (len(steps) - after)  # decoded alone
