"""The inference engine (no HTTP here): batched generation with a KV cache, stop
strings and stop tokens, logprobs, and log-likelihood scoring.

`Engine.generate` runs a batch of requests together: one prefill over the left-padded
prompts, then one decode step per token for the rows still running; a finished row
leaves the batch. `Batcher` puts requests that arrive together (from many HTTP
handlers) into the same batch, on one worker thread that owns the model.
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

from serve.kv import KVCache, forward_cached
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


def _logprob_entry(logprobs: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
    """logprobs (V,) fp32. The token's own value and its alternatives come from the
    same tensor, so a greedy token's logprob equals its top-1 entry bit for bit."""
    top = torch.topk(logprobs, max(1, top_n)) if top_n else None
    alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return TokenLogprob(token, float(logprobs[token]), alts)


class Engine:
    def __init__(self, loaded: LoadedModel, *, max_batch: int = 32):
        self.m = loaded
        self.max_batch = max_batch
        self.context = loaded.config.max_seq_len

    # ---------------------------------------------------------------- text helpers
    def decode(self, ids: list[int]) -> str:
        return self.m.tokenizer.decode(ids, skip_special_tokens=False)

    def encode(self, text: str) -> list[int]:
        return self.m.tokenizer.encode(text, add_special_tokens=False).ids

    def token_text(self, token_id: int) -> str:
        return self.decode([token_id])

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, requests: list[Request]) -> list[Result]:
        dev = self.m.device
        B = len(requests)
        lens = [len(r.prompt_ids) for r in requests]
        if min(lens) == 0:
            raise ValueError("empty prompt")
        L = max(lens)
        max_new = max(r.params.max_tokens for r in requests)
        ids = torch.zeros(B, L, dtype=torch.long, device=dev)
        key_valid = torch.ones(B, L + max_new, dtype=torch.bool, device=dev)
        for i, r in enumerate(requests):
            ids[i, L - lens[i]:] = torch.tensor(r.prompt_ids, device=dev)
            key_valid[i, : L - lens[i]] = False
        pads = torch.tensor([L - n for n in lens], device=dev)
        positions = (torch.arange(L, device=dev)[None] - pads[:, None]).clamp(min=0)  # (B, L)
        cache = KVCache(self.m.model, B, L + max_new)
        need_all = any(r.prompt_logprobs for r in requests)
        logits = forward_cached(self.m.model, cache, ids, positions, key_valid, all_logits=need_all)
        results = [Result(r.prompt_ids, [], "", "length") for r in requests]
        if need_all:
            for i, r in enumerate(requests):
                if r.prompt_logprobs:
                    results[i].prompt_logprobs = self._prompt_logprobs(logits[i, L - lens[i]:], r)
            logits = logits[:, -1]  # (B, V)
        generators = [torch.Generator().manual_seed(r.params.seed if r.params.seed is not None
                                                    else random.getrandbits(63)) for r in requests]
        seen = [torch.tensor(r.prompt_ids, device=dev) for r in requests]
        streamed = [""] * B
        active = [i for i, r in enumerate(requests) if r.params.max_tokens > 0]
        rows = list(active)  # row in the current batch tensors -> request index
        if len(rows) < B:
            keep = torch.tensor(rows, device=dev, dtype=torch.long)
            logits, key_valid, cache = logits[keep], key_valid[keep], self._keep(cache, keep)
        step = 0
        while rows:
            new_tokens, still = [], []
            for row, i in enumerate(rows):
                r, res = requests[i], results[i]
                row_logits = logits[row]
                tok = next_token(row_logits, r.params, seen[i], generators[i])
                if r.params.logprobs is not None:
                    res.output_logprobs = res.output_logprobs or []
                    res.output_logprobs.append(_logprob_entry(torch.log_softmax(row_logits, -1), tok,
                                                              r.params.logprobs))
                done = self._advance(r, res, tok)
                seen[i] = torch.cat([seen[i], torch.tensor([tok], device=dev)])
                if r.on_text is not None:
                    streamed[i] = self._stream(r, res, streamed[i], final=done)
                if not done:
                    new_tokens.append(tok)
                    still.append(row)
            if not still:
                break
            keep = torch.tensor(still, device=dev, dtype=torch.long)
            if len(still) < len(rows):
                key_valid, cache = key_valid[keep], self._keep(cache, keep)
            rows = [rows[k] for k in still]
            pos = torch.tensor([[lens[i] + step] for i in rows], device=dev)  # (B', 1)
            step += 1
            logits = forward_cached(self.m.model, cache, torch.tensor(new_tokens, device=dev)[:, None], pos,
                                    key_valid)
        return results

    @staticmethod
    def _keep(cache: KVCache, keep: torch.Tensor) -> KVCache:
        cache.keep_rows(keep)
        return cache

    def _prompt_logprobs(self, logits: torch.Tensor, r: Request) -> list[TokenLogprob | None]:
        """logits (n, V) at the prompt's real positions; token j is scored by j - 1."""
        lp = torch.log_softmax(logits[:-1], dim=-1)  # (n-1, V)
        top_n = r.params.logprobs or 0
        return [None] + [_logprob_entry(lp[j - 1], tok, top_n) for j, tok in enumerate(r.prompt_ids) if j > 0]

    def _advance(self, r: Request, res: Result, tok: int) -> bool:
        """Append tok; True when the request is finished."""
        if tok in r.params.stop_ids:
            res.finish_reason = "stop"
            if res.output_logprobs:
                res.output_logprobs.pop()  # the stop token is not part of the answer
            return True
        res.output_ids.append(tok)
        res.text = self.decode(res.output_ids)
        for s in r.params.stop:
            cut = res.text.find(s)
            if s and cut >= 0:
                res.text, res.finish_reason = res.text[:cut], "stop"
                return True
        if len(res.output_ids) >= r.params.max_tokens:
            res.finish_reason = "length"
            return True
        return False

    @staticmethod
    def _stream(r: Request, res: Result, sent: str, final: bool) -> str:
        """Send the new text, holding back what may still become a stop string or is a
        partial UTF-8 character."""
        text = res.text
        if not final:
            hold = max((k for s in r.params.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - hold]
            text = text.rstrip("\ufffd")
        if len(text) > len(sent) and text.startswith(sent):
            r.on_text(text[len(sent):])
            return text
        return sent

    # ---------------------------------------------------------------- scoring
    def score(self, sequences: list[list[int]], top_n: int = 1) -> list[list[TokenLogprob | None]]:
        """Logprob of every token given the ones before it (first token: None)."""
        out = []
        for start in range(0, len(sequences), self.max_batch):
            chunk = [Request(s, SamplingParams(max_tokens=0, logprobs=top_n), prompt_logprobs=True)
                     for s in sequences[start:start + self.max_batch]]
            out += [r.prompt_logprobs for r in self.generate(chunk)]
        return out


class Batcher:
    """One worker thread owns the engine; requests that arrive within `wait_ms` of each
    other (up to max_batch) are generated together."""

    def __init__(self, engine: Engine, *, wait_ms: float = 5.0, on_batch: Callable[[int], None] | None = None):
        self.engine, self.wait = engine, wait_ms / 1000
        self.on_batch = on_batch
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name=f"engine-{engine.m.name}", daemon=True)
        self.thread.start()

    def submit(self, request: Request) -> Future:
        fut: Future = Future()
        self.queue.put((request, fut))
        return fut

    def _loop(self) -> None:
        while True:
            batch = [self.queue.get()]
            deadline = time.monotonic() + self.wait
            while len(batch) < self.engine.max_batch:
                try:
                    batch.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            if self.on_batch:
                self.on_batch(len(batch))
            try:
                results = self.engine.generate([req for req, _ in batch])
                for (_, fut), res in zip(batch, results):
                    fut.set_result(res)
            except Exception as exc:  # noqa: BLE001 - hand the error to every waiting request
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
