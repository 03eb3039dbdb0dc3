"""Continuous batching: the loop that owns a model and feeds the engine's batch.

`BatchLoop` takes the requests that have arrived between two decode steps, prefills
them into the running batch and steps it; each request is resolved the moment its
sequence ends. Where requests come from is a `take` function: a queue of this process
(`Batcher`, `zerolm serve --engine-thread`) or the pipe of an engine process
(serve/engine_process.py). Both return a `concurrent.futures.Future` per request;
cancelling it (asyncio does when the HTTP handler awaiting it is cancelled) marks the
request cancelled, and the loop drops its sequence before the next step, so a client
that went away stops costing decode steps and frees its row.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError
from typing import Callable

from serve.engine import Aborted, Engine, Request

Resolve = Callable[[object], None]  # called once with the Result or the Exception
Take = Callable[[bool, int], "list[tuple[Request, Resolve]] | None"]
OnBatch = Callable[[int, float], None]  # after each decode step: sequences in it, its wall seconds


class BatchLoop:
    """Continuous batching. Between decode steps it takes every request that has arrived
    (up to max_batch running), drops the cancelled ones, prefills the rest together and
    joins them to the running batch; each request is resolved the moment its sequence ends.

    `take(block, limit)` supplies new requests: it may block only when nothing is
    running, and returns None to stop the loop. A thread-local queue (`Batcher`) or
    the pipe of an engine process (`serve/engine_process.py`) provides it."""

    def __init__(self, engine: Engine, take: Take, on_batch: OnBatch | None = None):
        self.engine, self.take, self.on_batch = engine, take, on_batch

    def run(self) -> None:
        batch = self.engine.new_batch(rows=self.engine.max_batch)  # one cache (and its graphs) for the loop's life
        batch.decoder.warm_up()
        while True:
            new = self.take(not batch, self.engine.max_batch - len(batch))
            if new is None:
                for seq in batch.seqs:
                    seq.done(RuntimeError("the engine is shutting down"))
                return
            # take() is where cancellations arrive (a flag set by another thread, or an
            # abort message on the pipe): drop those rows before spending a step on them.
            self.engine.drop_cancelled(batch)
            for request, resolve in new:
                if request.cancelled:
                    resolve(Aborted())
            new = [(r, resolve) for r, resolve in new if not r.cancelled]
            if new:
                try:
                    self.engine.prefill(batch, [r for r, _ in new], [resolve for _, resolve in new])
                except Exception as exc:  # noqa: BLE001 - fail the new requests, keep the running ones
                    for _, resolve in new:
                        resolve(exc)
            if not batch:
                continue
            try:
                size, started = len(batch), time.perf_counter()
                self.engine.step(batch)
                if self.on_batch:
                    self.on_batch(size, time.perf_counter() - started)
            except Exception as exc:  # noqa: BLE001 - fail what was running, keep serving
                for seq in batch.seqs:
                    seq.done(exc)
                batch.clear()


class Batcher:
    """Continuous batching on a worker thread of this process (`zerolm serve
    --engine-thread`). By default the server runs the same loop in an engine process
    instead, so the model's Python work never holds the HTTP process's GIL."""

    def __init__(self, engine: Engine, *, wait_ms: float = 2.0, on_batch: OnBatch | None = None):
        self.engine, self.wait = engine, wait_ms / 1000
        self.queue: queue.Queue = queue.Queue()
        loop = BatchLoop(engine, self._take, on_batch)
        self.thread = threading.Thread(target=loop.run, name=f"engine-{engine.m.name}", daemon=True)
        self.thread.start()

    def submit(self, request: Request) -> Future:
        fut: Future = Future()
        # The loop reads the flag between steps; the Request is this very object.
        fut.add_done_callback(lambda f: setattr(request, "cancelled", True) if f.cancelled() else None)
        self.queue.put((request, resolver(fut)))
        return fut

    def _take(self, block: bool, limit: int) -> list:
        items: list = []
        if limit <= 0:
            return items
        try:
            if block:
                items.append(self.queue.get())
                if limit > 1:
                    items.append(self.queue.get(timeout=self.wait))  # let a burst arrive together
            while len(items) < limit:
                items.append(self.queue.get_nowait())
        except queue.Empty:
            pass
        return items


def resolver(fut: Future) -> Resolve:
    """Settle fut once with a Result or an Exception; a future already cancelled (or
    settled) stays as it is."""
    def resolve(outcome) -> None:
        if not fut.done():
            try:
                (fut.set_exception if isinstance(outcome, Exception) else fut.set_result)(outcome)
            except InvalidStateError:  # cancelled by another thread in between: nobody to tell
                pass
    return resolve
