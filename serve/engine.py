"""The inference engine (no HTTP here): batched generation with a KV cache, stop
strings and stop tokens, logprobs, and log-likelihood scoring.

Generation is a `Batch` of running sequences advanced one token per `step`.
Requests join a running batch between steps (`join`: their prompts are prefilled
together, then their cache slots are right-aligned with the running rows'), and a
finished sequence leaves the batch at once, so concurrent clients share every
decode step (continuous batching). `BatchLoop` drives this in the one thread that
owns the model (`Batcher`: a thread of this process; the server: an engine process,
serve/engine_process.py); `Engine.generate` runs a fixed list of requests to completion.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from serve.kv import KVCache, forward_cached, prepare_serving
from serve.loading import LoadedModel
from serve.sampling import SamplingParams, next_token


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # best alternatives, most likely first


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    prompt_logprobs: bool = False  # echo with logprobs: score the prompt tokens too
    on_text: Callable[[str], None] | None = None  # streaming: text deltas, from the engine thread


@dataclass
class Result:
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first entry None
    output_logprobs: list[TokenLogprob] | None = None


@dataclass
class _Seq:
    """One running sequence: its request, result so far and sampling state."""

    req: Request
    res: Result
    done: Callable[[Result], None]
    generator: torch.Generator
    seen: torch.Tensor | None  # ids so far, only with a repetition penalty
    streamed: str = ""


class Batch:
    """Running sequences: rows of the cache, their key masks, next-token logits and the
    RoPE position of the next token each row feeds (kept on the device: a decode step
    then copies nothing from the host unless rows leave or sample)."""

    def __init__(self, seqs: list[_Seq], cache: KVCache, key_valid: torch.Tensor, logits: torch.Tensor,
                 positions: torch.Tensor, first_slot: list[int]):
        self.seqs, self.cache, self.key_valid, self.logits = seqs, cache, key_valid, logits
        self.positions = positions  # (B,) long
        self.first_slot = first_slot  # per row: cache slot of its first real token

    def keep(self, rows: list[int]) -> torch.Tensor:
        """Keep only `rows` (in order). Cache slots left of every remaining row's first
        token are cut off, so attention spans the longest live sequence, not the time
        the batch has been running (under steady load it never empties)."""
        cut = min(self.first_slot[r] for r in rows)
        if cut:
            self.cache.trim_left(cut)
            self.key_valid = self.key_valid[:, cut:]
        keep = torch.tensor(rows, device=self.key_valid.device)
        self.cache.keep_rows(keep)
        self.key_valid, self.positions, self.logits = self.key_valid[keep], self.positions[keep], self.logits[keep]
        self.seqs = [self.seqs[r] for r in rows]
        self.first_slot = [self.first_slot[r] - cut for r in rows]
        return keep

    def __len__(self) -> int:
        return len(self.seqs)


def _logprob_entry(logprobs: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
    """logprobs (V,) fp32. The token's own value and its alternatives come from the
    same tensor, so a greedy token's logprob equals its top-1 entry bit for bit."""
    top = torch.topk(logprobs, max(1, top_n)) if top_n else None
    alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return TokenLogprob(token, float(logprobs[token]), alts)


class TextCodec:
    """The tokenizer side of a served model: what the HTTP layer needs (encode, decode,
    context window) without the weights, so it also runs where the model does not."""

    def __init__(self, loaded: LoadedModel, *, max_batch: int = 32):
        self.m = loaded
        self.max_batch = max_batch
        self.context = loaded.config.max_seq_len

    def decode(self, ids: list[int]) -> str:
        return self.m.tokenizer.decode(ids, skip_special_tokens=False)

    def encode(self, text: str) -> list[int]:
        return self.m.tokenizer.encode(text, add_special_tokens=False).ids

    def token_text(self, token_id: int) -> str:
        return self.decode([token_id])


class Engine(TextCodec):
    def __init__(self, loaded: LoadedModel, *, max_batch: int = 32):
        if loaded.model is None:
            raise ValueError(f"model {loaded.name!r} was loaded without its weights")
        super().__init__(loaded, max_batch=max_batch)
        prepare_serving(loaded.model)

    # ---------------------------------------------------------------- batch life cycle
    @torch.no_grad()
    def prefill(self, requests: list[Request], callbacks: list[Callable[[Result], None]]) -> Batch | None:
        """Run the prompts of new requests; requests that need no generation finish
        here. Returns the batch of sequences still to decode (or None)."""
        dev = self.m.device
        lens = [len(r.prompt_ids) for r in requests]
        if min(lens) == 0:
            raise ValueError("empty prompt")
        B, L = len(requests), max(lens)
        room = max(r.params.max_tokens for r in requests)
        # Built on the host and copied once: per-row writes would be B small copies each.
        ids = torch.tensor([[0] * (L - n) + list(r.prompt_ids) for r, n in zip(requests, lens)]).to(dev)
        pads = torch.tensor([L - n for n in lens])
        key_valid = (torch.arange(L + room)[None] >= pads[:, None]).to(dev)  # (B, L + room): False = padding
        positions = (torch.arange(L)[None] - pads[:, None]).clamp(min=0).to(dev)  # (B, L)
        cache = KVCache(self.m.model, B, L + room)
        need_all = any(r.prompt_logprobs for r in requests)
        logits = forward_cached(self.m.model, cache, ids, positions, key_valid, all_logits=need_all)
        seqs: list = [None] * B  # None: finished at prefill (max_tokens 0)
        rows = []
        for i, (r, cb) in enumerate(zip(requests, callbacks)):
            res = Result(r.prompt_ids, [], "", "length")
            if r.prompt_logprobs:
                res.prompt_logprobs = self._prompt_logprobs(logits[i, L - lens[i]:], r)
            if r.params.max_tokens == 0:
                cb(res)
                continue
            seed = r.params.seed if r.params.seed is not None else random.getrandbits(63)
            seen = torch.tensor(r.prompt_ids, device=dev) if r.params.repetition_penalty != 1.0 else None
            seqs[i] = _Seq(r, res, cb, torch.Generator().manual_seed(seed), seen)
            rows.append(i)
        if not rows:
            return None
        logits = logits[:, -1] if need_all else logits  # (B, V)
        batch = Batch(seqs, cache, key_valid, logits, torch.tensor(lens, device=dev), [L - n for n in lens])
        if len(rows) < B:
            batch.keep(rows)
        return batch

    @torch.no_grad()
    def join(self, a: Batch, b: Batch) -> Batch:
        """One batch from two: cache slots right-aligned (keys already carry their RoPE
        positions, so moving them is exact), with room for every row's remaining tokens."""
        S = max(a.cache.length, b.cache.length)
        room = max(s.req.params.max_tokens - len(s.res.output_ids) for s in a.seqs + b.seqs)
        cache = KVCache(self.m.model, len(a) + len(b), S + room)
        key_valid = torch.ones(len(a) + len(b), S + room, dtype=torch.bool, device=self.m.device)
        row = 0
        for part in (a, b):
            n, off = len(part), S - part.cache.length
            cache.put_rows(row, off, part.cache)
            key_valid[row:row + n, :off] = False
            key_valid[row:row + n, off:S] = part.key_valid[:, :part.cache.length]
            row += n
        cache.length = S
        first = [f + S - a.cache.length for f in a.first_slot] + [f + S - b.cache.length for f in b.first_slot]
        return Batch(a.seqs + b.seqs, cache, key_valid, torch.cat([a.logits, b.logits]),
                     torch.cat([a.positions, b.positions]), first)

    @torch.no_grad()
    def step(self, batch: Batch) -> Batch | None:
        """Choose one token for every running sequence; finished ones leave (their
        callback gets the result); the rest run one decode step."""
        dev = self.m.device
        if dev.type == "cuda":
            # Wait for the GPU with the GIL released (.tolist() below would wait holding
            # it), so other threads of this process run meanwhile.
            torch.cuda.synchronize(dev)
        greedy_ids = batch.logits.argmax(-1)  # (B,) one op for every greedy row
        greedy = greedy_ids.tolist()
        still, new_tokens, all_greedy = [], [], True
        for row, seq in enumerate(batch.seqs):
            p, res = seq.req.params, seq.res
            if p.temperature <= 0 and seq.seen is None:
                tok = greedy[row]
            else:
                tok, all_greedy = next_token(batch.logits[row], p, seq.seen, seq.generator), False
            if p.logprobs is not None:
                res.output_logprobs = res.output_logprobs or []
                res.output_logprobs.append(_logprob_entry(torch.log_softmax(batch.logits[row], -1), tok, p.logprobs))
            finished = self._advance(seq, tok)
            if seq.seen is not None:
                seq.seen = torch.cat([seq.seen, torch.tensor([tok], device=dev)])
            if seq.req.on_text is not None:
                self._stream(seq, final=finished)
            if finished:
                if not (p.stop or seq.req.on_text is not None):
                    res.text = self.decode(res.output_ids)  # decoded once, at the end
                seq.done(res)
            else:
                still.append(row)
                new_tokens.append(tok)
        if not still:
            return None
        if len(still) < len(batch):
            greedy_ids = greedy_ids[batch.keep(still)]
        tokens = greedy_ids if all_greedy else torch.tensor(new_tokens, device=dev)
        pos, batch.positions = batch.positions, batch.positions + 1
        batch.logits = forward_cached(self.m.model, batch.cache, tokens[:, None], pos[:, None], batch.key_valid)
        return batch

    def generate(self, requests: list[Request]) -> list[Result]:
        """Run a fixed list of requests to completion (all in one batch)."""
        results: list = [None] * len(requests)
        callbacks = [(lambda i: lambda res: results.__setitem__(i, res))(i) for i in range(len(requests))]
        batch = self.prefill(requests, callbacks)
        while batch is not None:
            batch = self.step(batch)
        return results

    # ---------------------------------------------------------------- per token
    def _prompt_logprobs(self, logits: torch.Tensor, r: Request) -> list[TokenLogprob | None]:
        """logits (n, V) at the prompt's real positions; token j is scored by j - 1."""
        lp = torch.log_softmax(logits[:-1], dim=-1)  # (n-1, V)
        top_n = r.params.logprobs or 0
        return [None] + [_logprob_entry(lp[j - 1], tok, top_n) for j, tok in enumerate(r.prompt_ids) if j > 0]

    def _advance(self, seq: _Seq, tok: int) -> bool:
        """Append tok; True when the sequence is finished."""
        p, res = seq.req.params, seq.res
        if tok in p.stop_ids:
            res.finish_reason = "stop"
            if res.output_logprobs:
                res.output_logprobs.pop()  # the stop token is not part of the answer
            return True
        res.output_ids.append(tok)
        if p.stop or seq.req.on_text is not None:
            res.text = self.decode(res.output_ids)
        for s in p.stop:
            cut = res.text.find(s)
            if s and cut >= 0:
                res.text, res.finish_reason = res.text[:cut], "stop"
                return True
        if len(res.output_ids) >= p.max_tokens:
            res.finish_reason = "length"
            return True
        return False

    @staticmethod
    def _stream(seq: _Seq, final: bool) -> None:
        """Send the new text, holding back what may still become a stop string or is a
        partial UTF-8 character."""
        text, stops = seq.res.text, seq.req.params.stop
        if not final:
            hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - hold].rstrip("\ufffd")
        if len(text) > len(seq.streamed) and text.startswith(seq.streamed):
            seq.req.on_text(text[len(seq.streamed):])
            seq.streamed = text

    # ---------------------------------------------------------------- scoring
    def score(self, sequences: list[list[int]], top_n: int = 1) -> list[list[TokenLogprob | None]]:
        """Logprob of every token given the ones before it (first token: None)."""
        out = []
        for start in range(0, len(sequences), self.max_batch):
            chunk = [Request(s, SamplingParams(max_tokens=0, logprobs=top_n), prompt_logprobs=True)
                     for s in sequences[start:start + self.max_batch]]
            out += [r.prompt_logprobs for r in self.generate(chunk)]
        return out


Resolve = Callable[[object], None]  # called once with the Result or the Exception
Take = Callable[[bool, int], "list[tuple[Request, Resolve]] | None"]
OnBatch = Callable[[int, float], None]  # after each decode step: sequences in it, its wall seconds


class BatchLoop:
    """Continuous batching. Between decode steps it takes every request that has arrived
    (up to max_batch running), prefills them together and joins them to the running
    batch; each request is resolved the moment its sequence ends.

    `take(block, limit)` supplies new requests: it may block only when nothing is
    running, and returns None to stop the loop. A thread-local queue (`Batcher`) or
    the pipe of an engine process (`serve/engine_process.py`) provides it."""

    def __init__(self, engine: Engine, take: Take, on_batch: OnBatch | None = None):
        self.engine, self.take, self.on_batch = engine, take, on_batch

    def run(self) -> None:
        batch: Batch | None = None
        while True:
            running = len(batch) if batch is not None else 0
            new = self.take(batch is None, self.engine.max_batch - running)
            if new is None:
                if batch is not None:
                    for seq in batch.seqs:
                        seq.done(RuntimeError("the engine is shutting down"))
                return
            if new:
                try:
                    joined = self.engine.prefill([r for r, _ in new], [resolve for _, resolve in new])
                    if joined is not None:
                        batch = joined if batch is None else self.engine.join(batch, joined)
                except Exception as exc:  # noqa: BLE001 - fail the new requests, keep the running ones
                    for _, resolve in new:
                        resolve(exc)
            if batch is None:
                continue
            try:
                size, started = len(batch), time.perf_counter()
                batch = self.engine.step(batch)
                if self.on_batch:
                    self.on_batch(size, time.perf_counter() - started)
            except Exception as exc:  # noqa: BLE001 - fail what was running, keep serving
                for seq in batch.seqs:
                    seq.done(exc)
                batch = None


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
    def resolve(outcome) -> None:
        if not fut.done():
            (fut.set_exception if isinstance(outcome, Exception) else fut.set_result)(outcome)
    return resolve
