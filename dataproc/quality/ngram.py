"""A small n-gram language model: interpolated modified Kneser-Ney over hashed
n-grams, trained and evaluated with numpy (no per-token Python).

Why Kneser-Ney: it is a proper distribution (every context's probabilities sum to 1,
unseen tokens included), so a document's perplexity means what it says and can be
compared across documents; modified KN (three discounts per order, Chen & Goodman
1998) is the best-performing classic smoothing on small corpora, and it is what
CCNet's KenLM perplexity filter uses. Stupid backoff is cheaper to build but its
scores are not probabilities (they need not sum to 1), so a "perplexity" from it is
not one; add-k smoothing gives far too much mass to unseen n-grams.

Tokens (one tokenizer for both languages): every CJK character, every punctuation
mark or symbol, and every run of other letters/digits (a word) is one token; lower
case, digits folded to 0. So a model trained on Chinese is a character model and a
model trained on English a word model, as the seed's notes ask.

Probabilities, for order k = 1..N with context h (the k-1 previous tokens):
    p_k(w|h) = a_k(h w) + gamma_k(h) * p_{k-1}(w|h')        p_0(w) = 1 / V
    a_k(h w)  = max(c(h w) - D_k(c), 0) / sum_w c(h w)
    gamma_k(h) = (D_k1 N1(h.) + D_k2 N2(h.) + D_k3 N3+(h.)) / sum_w c(h w)
where c is the raw count at the top order and the continuation count N1+(. h w) below
it (raw counts for n-grams that start at the document start, which have no real left
context), and V the number of token types + 1 (one share for every unseen token). An
unseen context has gamma = 1, a = 0. Documents are padded with N-1 BOS and end with
EOS, which is predicted too.

n-grams are 64-bit hashes (collisions at these table sizes: ~1e-7 chance in total);
each order is stored as sorted key arrays with float32 values, looked up with
searchsorted. Unigram log-frequencies (add-one) are stored too, for the `rarity`
curriculum score (mean -log p(token)).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from dataproc.filters.charclass import CJK, DIGIT, LATIN, LETTER, PUNCT, SYMBOL, lower
from dataproc.filters.textstats import Chars, chunk_slices

FORMAT = "zerolm-ngram-v1"
_M1, _M2, _M3 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)
_B = np.uint64(0x100000001B3)
_B_INV = np.uint64(pow(int(_B), -1, 1 << 64))
BOS, EOS = np.uint64(0x0B05), np.uint64(0x0E05)  # outside the hash range of real tokens (see _mix)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection that scatters nearby inputs; the result has
    its top bit set so it never equals BOS/EOS."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * _M1
        x = x ^ (x >> np.uint64(27))
        x = x * _M2
        x = x ^ (x >> np.uint64(31))
    return x | np.uint64(1 << 63)


def _powers(base: np.uint64, n: int) -> np.ndarray:
    """[1, base, base**2, ...] (n values) modulo 2**64 (all-uint64: a Python int in the
    mix would turn the arrays into float64 and lose bits)."""
    out = np.ones(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        np.cumprod(np.full(max(n - 1, 0), base, dtype=np.uint64), out=out[1:])
    return out


def tokenize(texts: list[str], max_chars: int) -> tuple[np.ndarray, np.ndarray]:
    """(token hashes, tokens per document) for a batch, see the module docstring."""
    ch = Chars([t[:max_chars] for t in texts])
    cls = ch.cls
    single = (cls == CJK) | (cls == PUNCT) | (cls == SYMBOL)
    wordish = (cls == LATIN) | (cls == LETTER) | (cls == DIGIT)
    starts, ends = single | wordish, single | wordish
    starts[1:] &= single[1:] | ~wordish[:-1]
    ends[:-1] &= single[:-1] | ~wordish[1:]
    start, end = np.flatnonzero(starts), np.flatnonzero(ends) + 1
    cp = lower(ch.cp)
    cp[cls == DIGIT] = ord("0")
    # Polynomial hash of each token's code points from prefix sums (as textstats does):
    # hash[a:b] = (P[b] - P[a]) * B**-a  (mod 2**64), plus the length.
    with np.errstate(over="ignore"):
        prefix = np.zeros(len(cp) + 1, dtype=np.uint64)
        np.cumsum(cp * _powers(_B, len(cp)), out=prefix[1:])
        inv = _powers(_B_INV, len(cp))
        tok = _mix((prefix[end] - prefix[start]) * inv[start] + (end - start).astype(np.uint64))
    return tok, np.bincount(ch.doc[start], minlength=len(texts)).astype(np.int64)


def sequences(tok: np.ndarray, lens: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Padded token stream (N-1 BOS, tokens, EOS per document) and the positions
    predicted in it (each document's tokens and its EOS)."""
    pad = order - 1
    n = len(lens)
    total = lens + pad + 1
    starts = np.concatenate(([0], np.cumsum(total)[:-1])).astype(np.int64)
    seq = np.full(int(total.sum()), BOS, dtype=np.uint64)
    doc_of_tok = np.repeat(np.arange(n), lens)
    tok_starts = np.concatenate(([0], np.cumsum(lens)[:-1])).astype(np.int64)
    within = np.arange(len(tok)) - tok_starts[doc_of_tok]
    seq[starts[doc_of_tok] + pad + within] = tok
    seq[starts + pad + lens] = EOS
    pred_doc = np.repeat(np.arange(n), lens + 1)
    pred_starts = np.concatenate(([0], np.cumsum(lens + 1)[:-1])).astype(np.int64)
    pred = starts[pred_doc] + pad + (np.arange(int((lens + 1).sum())) - pred_starts[pred_doc])
    return seq, pred


def id_hashes(ids: np.ndarray) -> np.ndarray:
    """Token hashes of a tokenizer's ids, for a model over another tokenizer's tokens."""
    return _mix(np.asarray(ids, dtype=np.uint64))


def ngram_keys(seq: np.ndarray, order: int) -> list[np.ndarray]:
    """keys[k][t] = hash of the k tokens ending at t (keys[0] unused)."""
    keys = [np.zeros(0, np.uint64), _mix(seq)]
    for _ in range(2, order + 1):
        prev = keys[-1]
        k = np.zeros_like(seq)
        with np.errstate(over="ignore"):
            k[1:] = _mix(prev[:-1] * _M3 + seq[1:])
        keys.append(k)
    return keys


def _discounts(counts: np.ndarray) -> np.ndarray:
    """Modified KN discounts D1, D2, D3+ from counts of counts (Chen & Goodman),
    with a fallback when the sample is too small to estimate them."""
    n = [int(np.sum(counts == r)) for r in (1, 2, 3, 4)]
    if min(n) == 0:
        return np.array([0.5, 1.0, 1.5])
    y = n[0] / (n[0] + 2 * n[1])
    d = np.array([1 - 2 * y * n[1] / n[0], 2 - 3 * y * n[2] / n[1], 3 - 4 * y * n[3] / n[2]])
    return np.clip(d, 0.05, np.array([0.95, 1.95, 2.95]))


def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(keys) == 0:
        return np.zeros(len(query), bool), np.zeros(len(query), np.float64)
    idx = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    found = keys[idx] == query
    return found, np.where(found, values[idx], 0.0)


class NgramLM:
    """One language's model: per order k, sorted gram keys with a_k and sorted context
    keys with gamma_k; gamma_1 (empty context) and V as scalars."""

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict):
        self.order, self.vocab, self.gamma0 = int(meta["order"]), int(meta["vocab"]), float(meta["gamma0"])
        self.max_chars, self.meta = int(meta.get("max_chars", 100_000)), meta
        self.arrays = arrays
        self.unk_logp = float(meta["unk_logp"])

    @classmethod
    def train(cls, texts: list[str], order: int, max_chars: int = 100_000) -> "NgramLM":
        tok, lens = tokenize(texts, max_chars)
        return cls.from_tokens(tok, lens, order, max_chars=max_chars)

    @classmethod
    def from_tokens(cls, tok: np.ndarray, lens: np.ndarray, order: int, *, vocab: int | None = None,
                    max_chars: int = 100_000) -> "NgramLM":
        """From token hashes (`tokenize`, or `id_hashes` of a tokenizer's ids) and tokens
        per document. vocab: the number of token types the model spreads unseen mass
        over (default: the types seen + 1)."""
        if order < 1:
            raise ValueError("order must be >= 1")
        seq, pred = sequences(tok, lens, order)
        keys = ngram_keys(seq, order)
        arrays: dict[str, np.ndarray] = {}
        first_up = None  # positions (into pred) of one occurrence of each gram of order k+1
        gamma0 = 0.0
        for k in range(order, 0, -1):
            g_all = keys[k][pred]
            raw_keys, raw_first, raw_counts = np.unique(g_all, return_index=True, return_counts=True)
            if k == order:
                uniq, first, counts = raw_keys, raw_first, raw_counts
            else:
                uniq, idx, counts = np.unique(keys[k][pred[first_up]], return_index=True, return_counts=True)
                first = first_up[idx]
                # n-grams that start at a document start (with BOS) have no left context: raw counts
                at_start = seq[pred[first] - k + 1] == BOS
                counts = np.where(at_start, raw_counts[np.searchsorted(raw_keys, uniq)], counts)
            d = _discounts(counts)[np.minimum(counts, 3) - 1]
            if k > 1:
                ctx = keys[k - 1][pred[first] - 1]
            else:
                ctx = np.zeros(len(uniq), np.uint64)
            ctx_keys, inv = np.unique(ctx, return_inverse=True)
            denom = np.bincount(inv, weights=counts.astype(np.float64))
            gamma = np.bincount(inv, weights=d) / denom
            arrays[f"g{k}"], arrays[f"a{k}"] = uniq, ((counts - d) / denom[inv]).astype(np.float32)
            if k > 1:
                arrays[f"c{k}"], arrays[f"gamma{k}"] = ctx_keys, gamma.astype(np.float32)
            else:
                gamma0 = float(gamma[0])
                # add-one unigram log-frequency of each token type, for `rarity`
                tokens_total = float(raw_counts.sum())
                arrays["u"] = np.log((raw_counts + 1.0) / (tokens_total + len(raw_keys) + 1)).astype(np.float32)
                unk_logp = math.log(1.0 / (tokens_total + len(raw_keys) + 1))
                vocab = max(vocab or 0, len(uniq) + 1)
            first_up = first
        meta = {"order": order, "vocab": vocab, "gamma0": gamma0, "unk_logp": unk_logp, "max_chars": max_chars,
                "train_tokens": int(len(pred)), "train_docs": len(lens)}
        return cls(arrays, meta)

    def score(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(perplexity, rarity) per document; NaN for documents without tokens.
        rarity = mean -log p_unigram(token) over the tokens (EOS excluded)."""
        ppl, rarity = [], []
        for part in chunk_slices(texts, 1 << 22):  # bounded working memory
            p, r = self._score(texts[part])
            ppl.append(p)
            rarity.append(r)
        if not ppl:
            return np.zeros(0), np.zeros(0)
        return np.concatenate(ppl), np.concatenate(rarity)

    def token_logprobs(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(log p of every predicted token, document by document, each ending with
        EOS; tokens per document; token hashes)."""
        tok, lens = tokenize(texts, self.max_chars)
        return self.logprobs_of(tok, lens), lens, tok

    def logprobs_of(self, tok: np.ndarray, lens: np.ndarray) -> np.ndarray:
        """log p of every predicted token of documents given as token hashes, each
        document's tokens followed by its EOS."""
        seq, pred = sequences(tok, lens, self.order)
        keys = ngram_keys(seq, self.order)
        arr = self.arrays
        p = np.full(len(pred), 1.0 / self.vocab)
        for k in range(1, self.order + 1):
            _, a = _lookup(arr[f"g{k}"], arr[f"a{k}"], keys[k][pred])
            if k == 1:
                gamma = self.gamma0
            else:
                seen, gamma = _lookup(arr[f"c{k}"], arr[f"gamma{k}"], keys[k - 1][pred - 1])
                gamma[~seen] = 1.0
            p = a + gamma * p
        return np.log(p)

    def _score(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        n = len(texts)
        logp, lens, tok = self.token_logprobs(texts)
        arr = self.arrays
        pred_doc = np.repeat(np.arange(n), lens + 1)
        nll = -np.bincount(pred_doc, weights=logp, minlength=n)
        with np.errstate(invalid="ignore", divide="ignore"):
            ppl = np.where(lens > 0, np.exp(nll / (lens + 1)), np.nan)
            found, u = _lookup(arr["g1"], arr["u"], _mix(tok))
            u[~found] = self.unk_logp
            tok_doc = np.repeat(np.arange(n), lens)
            rarity = np.where(lens > 0, -np.bincount(tok_doc, weights=u, minlength=n) / lens, np.nan)
        return ppl, rarity


def save(models: dict[str, NgramLM], path: str | Path, extra: dict | None = None) -> None:
    """One .npz file holding every language's model and a JSON header."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"{lang}.{name}": a for lang, m in models.items() for name, a in m.arrays.items()}
    header = {"format": FORMAT, "languages": {lang: m.meta for lang, m in models.items()}, **(extra or {})}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, __header__=np.array(json.dumps(header)), **arrays)
    os.replace(tmp, path)


def read(path: str | Path) -> tuple[dict[str, NgramLM], dict]:
    """Load a model file; raises ValueError (or OSError) on anything that is not one."""
    import zipfile

    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # an .npz is a zip file
            raise ValueError("not a zerolm n-gram model (no .npz header)")
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(str(z["__header__"]))
            if header.get("format") != FORMAT:
                raise ValueError(f"format {header.get('format')!r}, expected {FORMAT!r}")
            data = {name: z[name] for name in z.files if name != "__header__"}
    except (zipfile.BadZipFile, KeyError, EOFError, json.JSONDecodeError) as exc:
        raise ValueError(str(exc) or type(exc).__name__)
    models = {}
    for lang, meta in header["languages"].items():
        arrays = {name.split(".", 1)[1]: a for name, a in data.items() if name.startswith(lang + ".")}
        need = {"u"} | {f"g{k}" for k in range(1, meta["order"] + 1)} | {f"a{k}" for k in range(1, meta["order"] + 1)}
        if not need <= set(arrays):
            raise ValueError(f"language {lang!r} lacks arrays {sorted(need - set(arrays))}")
        models[lang] = NgramLM(arrays, meta)
    return models, header
