"""The server's engine in a process of its own.

The HTTP layer (uvicorn, request parsing, tokenizing, JSON) and the model's decode
loop are both Python. In one process they share one GIL, and a decode loop that is
mostly kernel launches (a GPU) holds it nearly all the time: request handlers then get
it only every switch interval (5 ms) and lose it at every socket call, so requests
trickle into the batch instead of arriving together. Here the loop runs in a spawned
process that owns the model; the HTTP process keeps the tokenizer only. They talk over
one pipe:

    parent -> engine   ("submit", id, Request, stream)   ("abort", id)   ("close",)
    engine -> parent   ("ready", device, dtype) | ("load_error", message)   at start
                       ("done", id, Result | Exception)   ("text", id, delta)   ("batch", n, seconds)

`EngineClient.submit` returns a Future, the same interface as the in-process
`Batcher`; cancelling it sends ("abort", id), and the engine drops the sequence at its
next step. If the engine process dies, every pending and later request fails with a
clear error instead of hanging, and `alive` turns False (the server's /health
reports it, and the HTTP layer answers 503 from then on). A dead engine is not
restarted: the server is, by whatever watches /health.
"""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing as mp
import pickle
import signal
import threading
from collections import deque
from concurrent.futures import Future
from typing import Callable

from serve.batching import BatchLoop, OnBatch, resolver
from serve.engine import Aborted, Engine, Request
from zerolm.errors import UserError


class EngineDied(RuntimeError):
    pass


class EngineClient:
    """Parent side: starts the engine process, sends requests, resolves their futures."""

    def __init__(self, name: str, path: str, *, device: str = "auto", dtype: str = "auto", max_batch: int = 32,
                 wait_ms: float = 5.0, on_batch: OnBatch | None = None, cuda_graphs: bool | None = None):
        self.name, self.on_batch = name, on_batch
        ctx = mp.get_context("spawn")  # never fork a process that may hold CUDA or threads
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=engine_main, name=f"zerolm-engine-{name}", daemon=True,
                                args=(child_conn, name, str(path), device, dtype, max_batch, wait_ms, cuda_graphs))
        self.proc.start()
        child_conn.close()  # the child's end lives in the child: EOF here when it exits
        self.device, self.dtype = self._wait_ready()
        self._ids = itertools.count()
        self._pending: dict[int, tuple[Future, Callable[[str], None] | None]] = {}
        self._lock = threading.Lock()  # guards _pending and _dead
        self._send_lock = threading.Lock()  # one message at a time on the pipe
        self._dead: str | None = None
        self._receiver = threading.Thread(target=self._receive, name=f"engine-rx-{name}", daemon=True)
        self._receiver.start()

    def _wait_ready(self) -> tuple[str, str]:
        while not self.conn.poll(0.5):
            if not self.proc.is_alive():
                raise UserError(f"model {self.name!r}: the engine process exited while loading "
                                f"(exit code {self.proc.exitcode})")
        try:
            msg = self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            raise UserError(f"model {self.name!r}: the engine process exited while loading "
                            f"(exit code {self.proc.exitcode})") from None
        if msg[0] == "load_error":
            self.proc.join(5)
            raise UserError(msg[1])
        return msg[1], msg[2]

    @property
    def alive(self) -> bool:
        return self._dead is None

    @property
    def dead_reason(self) -> str | None:
        return self._dead

    def submit(self, request: Request) -> Future:
        fut: Future = Future()
        wire = dataclasses.replace(request, on_text=None)  # callbacks stay here; text arrives as messages
        with self._lock:  # registered before sending: its result cannot arrive first
            if self._dead is not None:
                fut.set_exception(EngineDied(self._dead))
                return fut
            rid = next(self._ids)
            self._pending[rid] = (fut, request.on_text)
        try:
            self._send(("submit", rid, wire, request.on_text is not None))
        except (OSError, ValueError) as exc:
            with self._lock:
                self._pending.pop(rid, None)
            resolver(fut)(EngineDied(f"model {self.name!r}: cannot reach the engine process ({exc})"))
        # After the submit is on the pipe, so an abort can never overtake it.
        fut.add_done_callback(lambda f, rid=rid: self._abort(rid) if f.cancelled() else None)
        return fut

    def _abort(self, rid: int) -> None:
        """The future was cancelled (its client went away): forget it here, so later
        text and its result are dropped, and tell the engine to stop decoding it."""
        with self._lock:
            if self._pending.pop(rid, None) is None:
                return  # finished (or the engine died) first: nothing is decoding it
        try:
            self._send(("abort", rid))
        except (OSError, ValueError):
            pass  # the engine is gone: nothing decodes it any more either

    def _send(self, msg) -> None:
        # Its own lock, never held with _lock: a send that waits for a full pipe must not
        # stop the receiver from draining the engine's replies (else both sides wait).
        with self._send_lock:
            self.conn.send(msg)

    def _receive(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                break
            kind = msg[0]
            if kind == "batch":
                if self.on_batch:
                    self.on_batch(msg[1], msg[2])
            elif kind == "text":
                entry = self._pending.get(msg[1])
                if entry is not None and entry[1] is not None:
                    entry[1](msg[2])
            elif kind == "done":
                with self._lock:
                    entry = self._pending.pop(msg[1], None)
                if entry is not None:
                    resolver(entry[0])(msg[2])
        self.proc.join(5)
        with self._lock:
            self._dead = (f"model {self.name!r}: the engine process exited (exit code {self.proc.exitcode}); "
                          "restart the server")
            pending, self._pending = self._pending, {}
        for fut, _ in pending.values():
            resolver(fut)(EngineDied(self._dead))

    def close(self, timeout: float = 10.0) -> None:
        """Stop the engine process (running requests fail); safe to call twice."""
        try:
            self._send(("close",))
        except (OSError, ValueError):
            pass
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout)


# ---------------------------------------------------------------------- engine process
def engine_main(conn, name: str, path: str, device: str, dtype: str, max_batch: int, wait_ms: float,
                cuda_graphs: bool | None = None) -> None:
    """Entry point of the engine process: load, report, then run the batch loop until
    the parent closes the pipe or asks to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server; the server stops this
    from serve.loading import load_model

    try:
        engine = Engine(load_model(name, path, device=device, dtype=dtype), max_batch=max_batch,
                        cuda_graphs=cuda_graphs)
    except Exception as exc:  # noqa: BLE001 - any load failure goes back to the parent as one line
        conn.send(("load_error", str(exc) if isinstance(exc, UserError) else
                   f"model {name!r}: cannot load {path}: {type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", str(engine.m.device), str(engine.m.dtype).removeprefix("torch.")))
    source = _PipeSource(conn, wait_ms / 1000)
    BatchLoop(engine, source.take, on_batch=lambda n, secs: source.send(("batch", n, secs))).run()


class _PipeSource:
    """Requests from the parent's pipe, read only between decode steps: everything that
    has arrived is drained at once, so a burst of requests is prefilled together."""

    def __init__(self, conn, wait_s: float):
        self.conn, self.wait = conn, wait_s
        self.backlog: deque = deque()  # received, not yet admitted (over max_batch)
        self.unfinished: dict[int, Request] = {}  # by id: what an abort message may cancel
        self.closed = False

    def send(self, msg) -> None:
        try:
            self.conn.send(msg)
        except (OSError, ValueError):
            self.closed = True  # the parent is gone; the loop stops at the next take

    def take(self, block: bool, limit: int):
        if self.closed:
            return None
        try:
            if block and not self.backlog:
                self._handle(self.conn.recv())
                if self.conn.poll(self.wait):  # let a burst arrive together
                    self._handle(self.conn.recv())
            while not self.closed and self.conn.poll(0):
                self._handle(self.conn.recv())
        except (EOFError, OSError):
            self.closed = True
        if self.closed:
            return None
        return [self.backlog.popleft() for _ in range(min(max(limit, 0), len(self.backlog)))]

    def _handle(self, msg) -> None:
        if msg[0] == "close":
            self.closed = True
            return
        if msg[0] == "abort":  # the loop drops it before its next step (or before its prefill)
            request = self.unfinished.get(msg[1])
            if request is not None:
                request.cancelled = True
            return
        _, rid, request, stream = msg
        if stream:
            request.on_text = lambda text, rid=rid: self.send(("text", rid, text))
        self.unfinished[rid] = request
        self.backlog.append((request, lambda outcome, rid=rid: self._finish(rid, outcome)))

    def _finish(self, rid: int, outcome) -> None:
        self.unfinished.pop(rid, None)
        if not isinstance(outcome, Aborted):  # the parent forgot an aborted request already
            self.send(("done", rid, _picklable(outcome)))


def _picklable(outcome):
    """A Result, or an exception the parent can rebuild (else its text)."""
    if isinstance(outcome, Exception):
        try:
            pickle.loads(pickle.dumps(outcome))
        except Exception:  # noqa: BLE001
            return RuntimeError(f"{type(outcome).__name__}: {outcome}")
    return outcome
