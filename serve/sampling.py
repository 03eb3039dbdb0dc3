"""Choosing the next token: greedy, or temperature / top-k / top-p sampling with a
repetition penalty, from a per-request seeded random stream (same seed, same text,
whatever else shares the batch).

Sampling is batched: every sampling row of a decode step is drawn by one set of
tensor operations on the model's device (inverse-CDF with one uniform number per row
from that row's own stream), so a step at batch 32 costs the same handful of kernels
as at batch 1 and reads one small tensor back, instead of a softmax, a sort and a
device-to-host copy per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # CTRL-style: > 1 discourages tokens already seen
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # top alternatives to report per generated token
    valid_utf8: bool = True  # only tokens that keep the text valid UTF-8 (serve/utf8.py); False: the raw model


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (V,) fp32; seen: ids in prompt + output. Positive logits are divided and
    negative multiplied, so the penalty always lowers the probability."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    logits = logits.clone()
    picked = logits[seen]
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], uniforms: list[float]) -> torch.Tensor:
    """Draw one token per row: logits (R, V) fp32, each row with its params (temperature
    > 0) and a uniform number in [0, 1) from its own stream. Returns (R,) token ids on
    logits' device.

    A row's distribution is softmax(logits / temperature), cut to its top_k tokens,
    then to the smallest prefix (most likely first) whose mass reaches top_p (never
    empty), renormalised; the token is where the row's uniform number falls in the
    cumulative distribution."""
    R, V = logits.shape
    cut = [(0 < p.top_k < V, p.top_p < 1.0) for p in params]
    knobs = torch.tensor([[p.temperature, p.top_k if k else V, p.top_p if t else float("inf"), u, not (k or t)]
                          for p, (k, t), u in zip(params, cut, uniforms)], dtype=torch.float32)
    temperature, top_k, top_p, u, uncut = knobs.to(logits.device)[:, :, None].unbind(1)  # one copy; each (R, 1)
    probs = torch.softmax(logits / temperature, dim=-1)
    last = V - 1  # the last token that may be drawn
    if any(k or t for k, t in cut):
        # Which tokens survive is decided most-likely-first; the draw itself is always in
        # token-id order, so a row without cuts draws the same token whether or not
        # other rows in the batch have them.
        ranked, ids = _most_likely(probs, top_k, top_p, uncut, max((p.top_k for p in params), default=0))
        K = ranked.shape[1]
        keep = torch.arange(K, device=logits.device) < top_k  # (R, K): the top_k most likely
        ranked = ranked * keep
        # renormalised over the top_k kept; without a top_k that is every token, also
        # those past the K ranked
        total = torch.where(top_k <= K, ranked.sum(-1, keepdim=True), probs.sum(-1, keepdim=True))
        ranked = ranked / total
        keep &= ranked.cumsum(-1) - ranked < top_p  # mass before a token < top_p: the first always stays
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, ids, keep) | (uncut > 0)  # token-id order
        probs = probs * keep
        last = (keep * torch.arange(V, device=logits.device)).amax(-1, keepdim=True)
    cdf = probs.cumsum(-1)
    token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # (R, 1): where u falls
    # u * total can round up to the total: never draw past the last token that may be drawn
    token = token.clamp_(max=last) if isinstance(last, int) else torch.minimum(token, last)
    return token[:, 0]


def _most_likely(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, uncut: torch.Tensor,
                 max_top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """probs (R, V) -> the K most likely (values, token ids), most likely first, with K
    large enough for every row's cut. On a GPU a full sort is a few microseconds; on a
    CPU it is ~3 ms per row of a 32k vocabulary, so first try the top 256 (and every
    top_k), enough unless a nucleus is wider, which this checks."""
    R, V = probs.shape
    if probs.is_cuda or V <= 1024:
        return probs.sort(dim=-1, descending=True)
    ranked, ids = probs.topk(min(V, max(256, max_top_k)), dim=-1)
    enough = (top_k <= ranked.shape[1]) | (ranked.sum(-1, keepdim=True) >= top_p) | (uncut > 0)
    return (ranked, ids) if bool(enough.all()) else probs.sort(dim=-1, descending=True)
