"""What evaluation needs from a model, and nothing more: token ids for a text, and the
log-probability of every token of a sequence given the tokens before it.

Two adapters give that view of a served model:
  * `EngineScorer(engine)` calls `Engine.score` directly (the `zerolm eval` CLI, tests);
  * `BatcherScorer(served)` submits scoring requests through the server's batcher (its
    engine process, or `Batcher` with --engine-thread), so an HTTP evaluation shares the
    one loop that owns the model with the completion requests arriving meanwhile.

`score_sequences` is what the tasks call: it groups sequences by length into calls
of bounded size (an engine call materialises B x L x V fp32 logits) and returns plain
floats.
"""

from __future__ import annotations

import sys
from typing import Protocol

from serve.engine import Engine, Request, TokenLogprob
from serve.sampling import SamplingParams

DOC_START = "<|endoftext|>"  # the pack separator: what precedes every document in training


class Scorer(Protocol):
    name: str
    context: int  # longest sequence (in tokens) that score() accepts
    doc_start_id: int | None  # token that opens a document in training, if the tokenizer has one
    vocab_size: int  # the model's output size (n-gram baselines spread unseen mass over it)

    def encode(self, text: str) -> list[int]: ...

    def score(self, seqs: list[list[int]]) -> list[list[TokenLogprob | None]]: ...


class EngineScorer:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.name = engine.m.name
        self.context = engine.context
        self.doc_start_id = engine.m.meta.specials.get(DOC_START)
        self.vocab_size = engine.m.config.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.engine.encode(text)

    def score(self, seqs: list[list[int]]) -> list[list[TokenLogprob | None]]:
        # top_n=0: the token's own logprob is all evaluation reads; no top-k per position.
        return self.engine.score(seqs, top_n=0)


class BatcherScorer:
    """Scoring through the server's batch loop (HTTP evaluations)."""

    def __init__(self, served):  # serve.registry.ServedModel (not imported: no cycle with the app)
        self.served = served
        self.name = served.name
        self.context = served.codec.context
        self.doc_start_id = served.loaded.meta.specials.get(DOC_START)
        self.vocab_size = served.loaded.config.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.served.codec.encode(text)  # the tokenizer is thread-safe; the model is not touched

    def score(self, seqs: list[list[int]]) -> list[list[TokenLogprob | None]]:
        # Submit at most one engine batch at a time, so completion requests that arrive
        # during a long evaluation wait for one batch, not for the whole evaluation.
        out: list[list[TokenLogprob | None]] = []
        step = self.served.codec.max_batch
        for i in range(0, len(seqs), step):
            futures = [self.served.batcher.submit(
                Request(list(s), SamplingParams(max_tokens=0, logprobs=0), prompt_logprobs=True))
                for s in seqs[i:i + step]]
            out += [f.result().prompt_logprobs for f in futures]
        return out


def score_sequences(scorer: Scorer, seqs: list[list[int]], *, token_budget: int = 16384,
                    progress: bool = False) -> list[list[float | None]]:
    """logprob of every token of every sequence given the ones before it (first: None).

    Sequences are scored longest first in groups of at most `token_budget` padded
    tokens, so similar lengths share a batch (little padding) and memory stays bounded."""
    for s in seqs:
        if not 0 < len(s) <= scorer.context:
            raise ValueError(f"sequence of {len(s)} tokens: must be 1..{scorer.context}")
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    groups, cur = [], []
    for i in order:
        # the group's padded size is (members + 1) x its first (longest) length
        if cur and (len(cur) + 1) * len(seqs[cur[0]]) > token_budget:
            groups.append(cur)
            cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    out: list[list[float | None]] = [[] for _ in seqs]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(s) for s in seqs), unit="tok", desc="scoring", file=sys.stderr, leave=False)
    for group in groups:
        results = scorer.score([seqs[i] for i in group])
        for i, entries in zip(group, results):
            out[i] = [None if e is None else e.logprob for e in entries]
            if bar is not None:
                bar.update(len(seqs[i]))
    if bar is not None:
        bar.close()
    return out
