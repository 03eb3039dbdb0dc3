"""The inference engine (no HTTP here): batched generation with a KV cache, stop
strings and stop tokens, logprobs, and log-likelihood scoring.

Generation is a `Batch` of running sequences advanced one token per `step`, each
sequence in its own row of a KV cache (serve/kv.py). Requests join a running batch
between steps (`prefill` writes their prompts into free rows; nothing running moves),
and a finished sequence leaves the batch at once, so concurrent clients share every
decode step (continuous batching). `BatchLoop` (serve/batching.py) drives this in
the one thread that owns the model; `Engine.generate` runs a fixed list of requests to
completion. A request whose submitter gives up (its HTTP client went away) is marked
`cancelled` and leaves the batch at the next step (`drop_cancelled`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

import torch

from serve.decoder import Decoder
from serve.kv import SlotCache, prefill
from serve.loading import LoadedModel
from serve.sampling import SamplingParams, apply_repetition_penalty, sample
from serve.utf8 import Utf8Guard


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
    # Set (from any thread) when nobody waits for the result any more; the loop that owns
    # the model drops the sequence between two steps, freeing its row for others.
    cancelled: bool = False


class Aborted(Exception):
    """The outcome of a request that was cancelled before it finished."""


@dataclass
class Result:
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first entry None
    output_logprobs: list[TokenLogprob] | None = None
    incomplete_bytes: int = 0  # cut at max_tokens inside a character: its bytes, left out of text


@dataclass
class _Seq:
    """One running sequence: its request, result so far and sampling state."""

    req: Request
    res: Result
    done: Callable[[Result], None]
    rng: random.Random  # the request's own stream: same seed, same tokens, whatever shares the batch
    seen: torch.Tensor | None  # ids so far, only with a repetition penalty
    streamed: str = ""
    # incremental detokenizing (stop strings, streaming): output_ids[text_from:] is
    # decoded each step, and output_ids[text_from:text_upto] is already in res.text
    text_from: int = 0
    text_upto: int = 0
    cut_at_stop: bool = False  # res.text was cut at a stop string
    utf8_state: int = 0  # continuation bytes the text still needs (serve/utf8.py)


class Batch:
    """The running sequences: seqs[i] owns row i of `cache`, which holds lengths[i] of
    its tokens; logits (n, V) are each row's next-token logits. New sequences are
    prefilled into the rows after the running ones, so joining moves nothing."""

    def __init__(self, cache: SlotCache, decoder: Decoder):
        self.cache, self.decoder = cache, decoder
        self.seqs: list[_Seq] = []
        self.lengths: list[int] = []
        self.logits: torch.Tensor | None = None

    def keep(self, rows: list[int]) -> list[int]:
        """Keep only `rows` (ascending): each live row above the new size moves into a
        freed row below it (one row copy per leaver at most; the others stay put).
        Returns, per new row, the old row it came from."""
        n, kept = len(rows), set(rows)
        order = list(range(n))
        for dst, src in zip([r for r in range(n) if r not in kept], [r for r in rows if r >= n]):
            self.cache.move_row(src, dst, self.lengths[src])
            order[dst] = src
        self.seqs = [self.seqs[r] for r in order]
        self.lengths = [self.lengths[r] for r in order]
        if order != list(range(len(self.logits))):
            self.logits = self.logits[torch.tensor(order, dtype=torch.long, device=self.logits.device)]
        return order

    def clear(self) -> None:
        """Drop every sequence (the cache and its CUDA graphs stay for the next ones)."""
        self.seqs, self.lengths, self.logits = [], [], None

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
    """cuda_graphs: None = on when the model is on a GPU (serve/decoder.py);
    static_shapes: decode in the shapes graphs use, on any device (tests)."""

    def __init__(self, loaded: LoadedModel, *, max_batch: int = 32, cuda_graphs: bool | None = None,
                 static_shapes: bool = False):
        if loaded.model is None:
            raise ValueError(f"model {loaded.name!r} was loaded without its weights")
        super().__init__(loaded, max_batch=max_batch)
        if cuda_graphs and loaded.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; model {loaded.name!r} is on {loaded.device}")
        self.cuda_graphs = loaded.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.static_shapes = static_shapes
        self.utf8 = Utf8Guard.for_tokenizer(loaded.tokenizer, loaded.config.vocab_size, loaded.device)

    def new_batch(self, *, rows: int = 1, graphs: bool = True) -> Batch:
        """An empty batch with its own cache. A long-lived one (the serving loop) keeps
        its cache, and with it its CUDA graphs, for as long as it runs."""
        cache = SlotCache(self.m.model, rows=rows, slots=256)
        return Batch(cache, Decoder(self.m.model, cache, graphs=graphs and self.cuda_graphs,
                                    static=self.static_shapes))

    # ---------------------------------------------------------------- batch life cycle
    @torch.no_grad()
    def prefill(self, batch: Batch, requests: list[Request], callbacks: list[Callable[[Result], None]]) -> None:
        """Run the prompts of new requests into the rows after batch's running ones.
        Requests that need no generation (max_tokens 0) finish here; the others join."""
        dev, n0 = self.m.device, len(batch)
        lens = [len(r.prompt_ids) for r in requests]
        for r, n in zip(requests, lens):
            if n == 0:
                raise ValueError("empty prompt")
            if n + r.params.max_tokens > self.context:
                raise ValueError(f"{n} prompt tokens + max_tokens {r.params.max_tokens} exceed the model's "
                                 f"context of {self.context}")
        m, L = len(requests), max(lens)
        batch.cache.reserve(n0 + m, L)
        # Built on the host and copied once: per-row writes would be m small copies each.
        ids = torch.tensor([list(r.prompt_ids) + [0] * (L - n) for r, n in zip(requests, lens)]).to(dev)
        need_all = any(r.prompt_logprobs for r in requests)
        logits = prefill(self.m.model, batch.cache, n0, ids, torch.tensor(lens).to(dev), all_logits=need_all)
        seqs: list = []
        for i, (r, cb) in enumerate(zip(requests, callbacks)):
            res = Result(r.prompt_ids, [], "", "length")
            if r.prompt_logprobs:
                res.prompt_logprobs = self._prompt_logprobs(logits[i, :lens[i]], r)
            if r.params.max_tokens == 0:
                cb(res)
                seqs.append(None)  # finished: its row is freed below
                continue
            seed = r.params.seed if r.params.seed is not None else random.getrandbits(63)
            seen = torch.tensor(r.prompt_ids, device=dev) if r.params.repetition_penalty != 1.0 else None
            seq = _Seq(r, res, cb, random.Random(seed), seen)
            if self.utf8 is not None and r.params.valid_utf8:  # a prompt of ids may end inside a character
                seq.utf8_state = self.utf8.state_after(r.prompt_ids[-4:])
            seqs.append(seq)
        if need_all:
            logits = logits[torch.arange(m, device=dev), torch.tensor(lens, device=dev) - 1]  # (m, V)
        batch.seqs += seqs
        batch.lengths += lens
        batch.logits = logits if batch.logits is None or n0 == 0 else torch.cat([batch.logits, logits])
        if None in seqs:
            batch.keep([row for row, s in enumerate(batch.seqs) if s is not None])

    @torch.no_grad()
    def step(self, batch: Batch) -> None:
        """Choose one token for every running sequence; finished ones leave (their
        callback gets the result); the rest run one decode step."""
        dev = self.m.device
        if dev.type == "cuda":
            # Wait for the GPU with the GIL released (.tolist() below would wait holding
            # it), so other threads of this process run meanwhile.
            torch.cuda.synchronize(dev)
        chosen = self._choose(batch)
        still, tokens = [], []
        for row, (seq, tok) in enumerate(zip(batch.seqs, chosen)):
            p, res = seq.req.params, seq.res
            if p.logprobs is not None:
                res.output_logprobs = res.output_logprobs or []
                res.output_logprobs.append(_logprob_entry(torch.log_softmax(batch.logits[row], -1), tok, p.logprobs))
            finished = self._advance(seq, tok)
            if finished and not seq.cut_at_stop:
                res.text = self.decode(res.output_ids)  # the whole text, decoded once at the end
                if seq.utf8_state and self.utf8 is not None and p.valid_utf8:
                    # cut at max_tokens inside a character: say so instead of ending with U+FFFD
                    res.incomplete_bytes = self.utf8.tail_bytes(res.output_ids[-4:])
                    res.text = res.text.removesuffix("\ufffd")
            if seq.seen is not None:
                seq.seen = torch.cat([seq.seen, torch.tensor([tok], device=dev)])
            if seq.req.on_text is not None:
                self._stream(seq, final=finished)
            if finished:
                seq.done(res)
            else:
                still.append(row)
                tokens.append(tok)
        if not still:
            batch.clear()
            return
        if len(still) < len(batch):
            token_of = dict(zip(still, tokens))
            tokens = [token_of[old] for old in batch.keep(still)]
        positions = batch.lengths
        batch.cache.reserve(len(batch), max(positions) + 1)
        batch.logits = batch.decoder(tokens, positions)
        batch.lengths = [n + 1 for n in positions]

    def _choose(self, batch: Batch) -> list[int]:
        """The next token of every row: greedy rows by one argmax, sampling rows by one
        batched draw (serve/sampling.py), read back to the host together. Tokens that
        would break the text's UTF-8 are ruled out first (logprobs report the model's own)."""
        logits, seqs = batch.logits, batch.seqs
        guarded = [row for row, seq in enumerate(seqs) if seq.req.params.valid_utf8] if self.utf8 else []
        if guarded:
            logits = self.utf8.mask(logits, guarded, [seqs[row].utf8_state for row in guarded])
        penalised = [row for row, seq in enumerate(seqs) if seq.seen is not None]
        if penalised:  # rare: one row at a time, on a copy (logprobs report the model's own)
            logits = logits.clone()
            for row in penalised:
                logits[row] = apply_repetition_penalty(logits[row], seqs[row].seen,
                                                       seqs[row].req.params.repetition_penalty)
        sampled = [row for row, seq in enumerate(seqs) if seq.req.params.temperature > 0]
        if len(sampled) == len(seqs):
            return sample(logits, [s.req.params for s in seqs], [s.rng.random() for s in seqs]).tolist()
        tokens = logits.argmax(-1)
        if sampled:
            rows = torch.tensor(sampled, device=logits.device)
            tokens[rows] = sample(logits[rows], [seqs[r].req.params for r in sampled],
                                  [seqs[r].rng.random() for r in sampled])
        return tokens.tolist()

    @staticmethod
    def drop_cancelled(batch: Batch) -> int:
        """Remove the sequences whose request was cancelled (each resolved with Aborted);
        their rows are free for the next prefill. Returns how many left."""
        gone = {row for row, seq in enumerate(batch.seqs) if seq.req.cancelled}
        for row in sorted(gone):
            batch.seqs[row].done(Aborted())
        if len(gone) == len(batch):
            batch.clear()
        elif gone:
            batch.keep([row for row in range(len(batch)) if row not in gone])
        return len(gone)

    def generate(self, requests: list[Request]) -> list[Result]:
        """Run a fixed list of requests to completion (all in one batch)."""
        results: list = [None] * len(requests)
        callbacks = [(lambda i: lambda res: results.__setitem__(i, res))(i) for i in range(len(requests))]
        batch = self.new_batch(rows=len(requests), graphs=False)
        self.prefill(batch, requests, callbacks)
        while len(batch):
            self.step(batch)
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
        if self.utf8 is not None and p.valid_utf8:
            seq.utf8_state = int(self.utf8.next_state[seq.utf8_state, tok])
        if p.stop or seq.req.on_text is not None:
            self._extend_text(seq)
        for s in p.stop:
            cut = res.text.find(s)
            if s and cut >= 0:
                res.text, res.finish_reason, seq.cut_at_stop = res.text[:cut], "stop", True
                return True
        if len(res.output_ids) >= p.max_tokens:
            res.finish_reason = "length"
            return True
        return False

    def _extend_text(self, seq: _Seq) -> None:
        """Add the text of the newest tokens to res.text by decoding only the last few
        tokens (decoding the whole output every step costs O(n) per token: 0.1 ms at
        512 tokens, per sequence, per step). The window starts one emitted chunk back,
        so a token whose text depends on the one before it decodes as in context; text
        that ends in a partial UTF-8 character waits for the token that completes it."""
        ids, res = seq.res.output_ids, seq.res
        before = self.decode(ids[seq.text_from:seq.text_upto])
        now = self.decode(ids[seq.text_from:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            res.text += now[len(before):]
            seq.text_from, seq.text_upto = seq.text_upto, len(ids)

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
