"""What a model's bits per byte beats: n-gram baselines on the same documents and bytes.

Beside the model, `zerolm eval --task bpb` scores every document with a unigram and
an interpolated modified Kneser-Ney 3-gram (dataproc/quality/ngram.py) trained on
text the model was trained on (by default the train split of the pack being
evaluated). Both work on the *model's own tokens*: each document is encoded with the
model's tokenizer, the n-grams predict the same tokens the model predicts (the
document-start token given, no end token), and their nats are divided by the same
UTF-8 bytes. So the three numbers differ only in the model: a transformer that does
not beat the 3-gram has not yet learnt more than local token statistics.

The n-grams are proper distributions over the model's whole vocabulary (unseen token
types share the interpolated uniform mass 1/vocab), so an unseen token costs bits
rather than being skipped.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from dataproc.quality.ngram import NgramLM, id_hashes

BASELINES = (("unigram", 1), ("kn3", 3))
MAX_TRAIN_TOKENS = 20_000_000  # bounds time and memory (about 30 s and 3 GB at the cap)


class NgramBaselines:
    def __init__(self, models: dict[str, NgramLM], train_docs: int, train_tokens: int):
        self.models, self.train_docs, self.train_tokens = models, train_docs, train_tokens

    @classmethod
    def train(cls, encode: Callable[[str], list[int]], texts: Iterable[str], vocab_size: int,
              max_tokens: int = MAX_TRAIN_TOKENS) -> "NgramBaselines | None":
        """None when there is no training text."""
        docs, total = [], 0
        for text in texts:
            ids = np.asarray(encode(text), dtype=np.int64)
            docs.append(ids)
            total += len(ids)
            if total >= max_tokens:
                break
        if not total:
            return None
        tok, lens = id_hashes(np.concatenate(docs)), np.array([len(d) for d in docs], dtype=np.int64)
        # + 1: the end of a document is a type the n-grams predict too (its mass is not counted in nats())
        models = {name: NgramLM.from_tokens(tok, lens, order, vocab=vocab_size + 1) for name, order in BASELINES}
        return cls(models, len(docs), total)

    def nats(self, docs: list[list[int]]) -> dict[str, float]:
        """Summed -log p of every token of each document (its end not predicted)."""
        if not docs:
            return {name: 0.0 for name in self.models}
        lens = np.array([len(d) for d in docs], dtype=np.int64)
        tok = id_hashes(np.concatenate([np.asarray(d, dtype=np.int64) for d in docs]))
        keep = np.ones(int((lens + 1).sum()), dtype=bool)
        keep[np.cumsum(lens + 1) - 1] = False  # each document's EOS: the model scores no end
        return {name: -float(m.logprobs_of(tok, lens)[keep].sum()) for name, m in self.models.items()}

    def describe(self) -> dict:
        return {"models": {name: f"{'unigram' if order == 1 else f'Kneser-Ney {order}-gram'} over the model's tokens"
                           for name, order in BASELINES},
                "train_docs": self.train_docs, "train_tokens": self.train_tokens}
