"""Running decode steps for one SlotCache: eagerly, or as CUDA graphs.

On a GPU, a small model's decode step is launch-bound: a few hundred kernels of
microseconds each, every one launched from Python, so the step takes as long as the
launches (~8 ms for a 12-layer model, whatever the batch). A CUDA graph records the
step's kernels once and replays them as one launch. That needs fixed shapes and fixed
input addresses, so here the step runs on a batch rounded up to a power of two (the
extra rows decode a dummy token in rows no sequence owns) and a key length rounded up
to a power of two (slots past a row's position are masked anyway), reading tokens and
positions from one buffer that each step overwrites. One graph per (rows, key length)
is captured when first needed, all sharing one memory pool, and dropped when the cache
reallocates (new addresses).

A capture that fails, or whose replay does not reproduce the eager step it was
captured from, turns graphs off for this decoder with a warning: decoding goes on
eagerly, never wrongly. `static=True` without graphs runs the same rounded-up shapes
eagerly, which is how the CPU tests check what a graph would compute.
"""

from __future__ import annotations

import logging
import threading

import torch

from serve.kv import SlotCache, decode, next_pow2
from train.model import Transformer

log = logging.getLogger(__name__)

MIN_KEY_BUCKET = 64  # smallest key length a graph is captured for
_CAPTURE_LOCK = threading.Lock()  # PyTorch allows one capture per process at a time (engine threads)


class Decoder:
    def __init__(self, model: Transformer, cache: SlotCache, *, graphs: bool = False, static: bool = False):
        self.model, self.cache = model, cache
        self.graphs, self.static = graphs, static or graphs
        self._static_asked = static
        self._version = -1  # cache.version the buffer and graphs below were made for
        self._inputs: torch.Tensor | None = None  # (2, cache.rows): tokens, positions
        self._captured: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None  # one memory pool for all graphs of a cache (they never run at once)
        self._stream = None  # the stream the graphs are warmed up and captured on
        self.captures = 0  # graphs captured so far (tests, metrics)

    def __call__(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Logits (n, V) after feeding tokens[i] at slot positions[i] of row i (rows [0, n)).
        With graphs they are a view of a graph's output: valid until the next call."""
        n, key_len = len(tokens), max(positions) + 1
        dev = self.cache.device
        if not self.static:
            both = torch.tensor([tokens, positions], device=dev)  # one host-to-device copy
            return decode(self.model, self.cache, both[0], both[1], key_len)
        rows = min(next_pow2(n), self.cache.rows)
        keys = min(max(next_pow2(key_len), MIN_KEY_BUCKET), self.cache.slots)
        if self._version != self.cache.version:
            self._inputs = torch.zeros(2, self.cache.rows, dtype=torch.long, device=dev)
            self._captured.clear()  # they hold the old cache's addresses
            self._pool = None  # and the old pool may still hold memory (the last logits): start a new one
            self._version = self.cache.version
        pad = rows - n  # dummy rows: token 0 at slot 0 of rows no sequence owns
        self._inputs[:, :rows].copy_(torch.tensor([tokens + [0] * pad, positions + [0] * pad]))
        if self.graphs:
            out = self._replay(rows, keys)
            if out is not None:
                return out[:n]
        return self._step(rows, keys)[:n]

    def warm_up(self, max_keys: int = 256) -> None:
        """Run (and with graphs, capture) every batch size at every key length up to
        max_keys before serving, so the first requests do not wait for captures and a
        capture that fails shows at start. The dummy tokens go to rows no sequence owns
        yet (a prefill overwrites them)."""
        if not self.static:
            return
        rows = 1
        while rows <= self.cache.rows:
            keys = MIN_KEY_BUCKET
            while keys <= min(max_keys, self.cache.slots):
                self([0] * rows, [keys - 1] * rows)
                keys *= 2
            rows *= 2

    def _step(self, rows: int, keys: int) -> torch.Tensor:
        return decode(self.model, self.cache, self._inputs[0, :rows], self._inputs[1, :rows], keys)

    def _replay(self, rows: int, keys: int) -> torch.Tensor | None:
        entry = self._captured.get((rows, keys)) or self._capture(rows, keys)
        if entry is None:
            return None
        graph, out = entry
        with torch.cuda.device(self.cache.device):  # graphs replay on the device they were captured on
            graph.replay()
        return out

    def _capture(self, rows: int, keys: int):
        """Capture the step for these shapes from the current inputs. The warm-up run
        (needed before a capture) and the replay write the same keys and values to the
        same slots, so capturing in the middle of decoding changes nothing."""
        dev = self.cache.device
        with _CAPTURE_LOCK, torch.cuda.device(dev):  # one capture per process at a time
            previous = torch.cuda.current_stream(dev)
            try:
                # warm-up and capture on the same stream, which all this decoder's graphs share
                self._stream = self._stream or torch.cuda.Stream(device=dev)
                self._stream.wait_stream(previous)
                with torch.cuda.stream(self._stream):
                    eager = self._step(rows, keys)
                previous.wait_stream(self._stream)
                self._pool = self._pool or torch.cuda.graph_pool_handle()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"):
                    out = self._step(rows, keys)
                out.fill_(float("nan"))  # a replay that ran nothing would leave NaN, and fail the check
                graph.replay()
                if not torch.allclose(out, eager, rtol=1e-3, atol=1e-3, equal_nan=True) or out.isnan().all():
                    raise RuntimeError("the replay differs from the eager step")
            except Exception as exc:  # noqa: BLE001 - any failure: decode eagerly from now on
                log.warning("CUDA graph of the decode step (%d rows, %d keys) failed, decoding eagerly: %s",
                            rows, keys, exc)
                torch.cuda.set_stream(previous)  # a failed capture can leave its stream current
                self.graphs, self._pool = False, None
                self.static = self._static_asked  # eager in exact shapes: no padding to pay for
                self._captured.clear()
                try:
                    torch.cuda.synchronize(dev)
                except RuntimeError:
                    pass
                return None
        self.captures += 1
        self._captured[(rows, keys)] = (graph, out)
        return graph, out
