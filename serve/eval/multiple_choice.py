"""Multiple choice, k-shot, scored by log-likelihood (the format-free part).

A prompt format (serve/eval/cmmlu.py, serve/eval/arc.py) turns an item and its shots
into a context string and one continuation string per choice. Each continuation is
scored as lm-evaluation-harness scores it, so `zerolm eval` and lm-eval's
`local-completions` against `zerolm serve` send the model the same token ids:
trailing whitespace of the context moves to the continuation, context + continuation
is encoded as one text, and the continuation is the tokens after the context's own
encoding. The prediction is the choice of highest total log-likelihood (acc), and of
highest log-likelihood per UTF-8 byte of the continuation without its leading space
(acc_norm; lm-eval divides by characters, the same for ASCII choices). No
document-start token is prepended (lm-eval's local-completions sends none either).

A prompt longer than the model's context first loses shots (as the official CMMLU
code does), then is cut on the left; the item records how many shots it kept and
whether it was cut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from serve.eval.scorer import Scorer, score_sequences

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class MCItem:
    id: str
    subject: str
    question: str
    choices: list[str]
    gold: int  # index into choices
    labels: list[str] = field(default_factory=list)  # "A", "B", ... (default: letters)

    def __post_init__(self):
        if not self.labels:
            self.labels = list(LETTERS[:len(self.choices)])


@dataclass
class Prompt:
    context: str
    continuations: list[str]


PromptFormat = Callable[[MCItem, list[MCItem]], Prompt]  # (item, shots) -> prompt


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of (context, continuation) into token ids (see module docstring)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode(context + continuation)
    ctx = encode(context)
    # lm-eval cuts `whole` at len(ctx). Where the tokenizer merged across the boundary,
    # ctx is not a prefix of whole; cut at the common prefix instead, so the tokens sent
    # still spell context + continuation (no such merge occurs for the formats here).
    k = len(ctx)
    if whole[:k] != ctx:
        k = next((i for i, (a, b) in enumerate(zip(whole, ctx)) if a != b), min(len(whole), len(ctx)))
    k = max(1, min(k, len(whole) - 1))  # one context token to condition on, one token to score
    return whole[:k], whole[k:]


def _fit(pairs: list[tuple[list[int], list[int]]], context: int) -> list[tuple[list[int], list[int]]]:
    """Cut contexts on the left (and, in the degenerate case, continuations on the right)
    so every context + continuation fits the model."""
    out = []
    for ctx, cont in pairs:
        cont = cont[:context - 1]
        out.append((ctx[-(context - len(cont)):], cont))
    return out


def evaluate_multiple_choice(scorer: Scorer, items: list[MCItem], fmt: PromptFormat,
                             shots_of: Callable[[MCItem], list[MCItem]], *, shots: int, task: str,
                             progress: bool = False) -> dict:
    seqs: list[list[int]] = []
    owners: list[tuple[int, int]] = []  # (item index, context length) per sequence
    kept_shots, truncated, conts = [], [], []
    for idx, item in enumerate(items):
        pool = shots_of(item)[:shots] if shots else []
        for k in range(len(pool), -1, -1):
            prompt = fmt(item, pool[:k])
            pairs = [encode_pair(scorer.encode, prompt.context, c) for c in prompt.continuations]
            fits = max(len(a) + len(b) for a, b in pairs) <= scorer.context
            if fits:
                break
        kept_shots.append(k)
        truncated.append(not fits)
        conts.append(prompt.continuations)
        for ctx, cont in (pairs if fits else _fit(pairs, scorer.context)):
            seqs.append(ctx + cont)
            owners.append((idx, len(ctx)))
    logprobs = score_sequences(scorer, seqs, progress=progress)
    loglik: list[list[float]] = [[] for _ in items]
    for (idx, n_ctx), lps in zip(owners, logprobs):
        loglik[idx].append(math.fsum(lps[n_ctx:]))  # lps[j]: token j given tokens < j
    records = []
    for idx, item in enumerate(items):
        ll = np.array(loglik[idx])
        # acc_norm divides by the length of what is scored, without the delimiter (lm-eval:
        # len(doc_to_choice)): the choice text for ARC, the letter (1 byte: acc_norm = acc) for CMMLU
        lengths = np.array([max(1, len(c.lstrip().encode("utf-8"))) for c in conts[idx]], dtype=float)
        records.append({"id": item.id, "subject": item.subject, "gold": item.gold,
                        "pred": int(np.argmax(ll)), "pred_norm": int(np.argmax(ll / lengths)),
                        "gold_label": item.labels[item.gold], "n_choices": len(item.choices),
                        "logprobs": [float(x) for x in ll], "shots": kept_shots[idx], "truncated": truncated[idx]})
    # contexts too short for k shots: items that kept fewer shots, and items cut on the left even at 0 shots
    return {"task": task, "model": scorer.name, "shots": shots, **accuracy(records),
            "items_with_fewer_shots": sum(k < shots for k in kept_shots), "items_truncated": sum(truncated),
            "items": records}


def _row(records: list[dict]) -> dict:
    n = len(records)
    return {"n": n,
            "acc": sum(r["pred"] == r["gold"] for r in records) / n if n else None,
            "acc_norm": sum(r["pred_norm"] == r["gold"] for r in records) / n if n else None,
            "chance": sum(1 / r["n_choices"] for r in records) / n if n else None}


def accuracy(records: list[dict]) -> dict:
    """Accuracy overall (over items) and per subject; chance = mean of 1 / choices.
    `acc_macro` in overall is the mean of the subjects' accuracies."""
    by_subject: dict[str, list[dict]] = {}
    for r in records:
        by_subject.setdefault(r["subject"], []).append(r)
    subjects = {s: _row(rs) for s, rs in sorted(by_subject.items())}
    overall = _row(records)
    overall["acc_macro"] = (sum(row["acc"] for row in subjects.values()) / len(subjects)) if subjects else None
    return {"overall": overall, "subjects": subjects}
