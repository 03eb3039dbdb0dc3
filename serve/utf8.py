"""Valid UTF-8 from byte-level vocabularies.

A byte-level BPE vocabulary has tokens that are fragments of a character (the first
two bytes of 中, a lone continuation byte), so a model can emit byte sequences that
are not UTF-8: decoded, they show U+FFFD. A small model does so often (the demo's
pretrained model: 11 of 32 sampled 40-token completions had one). `Utf8Guard` tracks,
per sequence, how many continuation bytes the text still needs (0-3) and masks the
tokens that cannot follow: at state 0 a token may not start with a continuation byte;
at state k it must start with exactly the k missing bytes (or be k or fewer of them).
Special tokens (end of turn, end of text) may come only between characters. So every
completion that ends by a stop token decodes whole; one cut at max_tokens may end
inside a character, and the engine reports those bytes (Result.incomplete_bytes)
instead of a trailing U+FFFD.

The lead byte's second-byte ranges (overlong forms, surrogates: E0 A0-BF, ED 80-9F,
F0 90-BF, F4 80-8F) are not tracked; such sequences are vanishingly rare in practice.
Vocabularies whose bytes cannot be read (a decoder other than ByteLevel or
ByteFallback) get no guard.
"""

from __future__ import annotations

import json

import numpy as np
import torch


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the character each byte is written as."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_bytes(tokenizer) -> list[bytes | None] | None:
    """The bytes of every token id (None: a special token), or None when the
    tokenizer's decoder is not one this module can read."""
    spec = json.loads(tokenizer.to_str())
    decoder = spec.get("decoder") or {}
    kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    out: list[bytes | None] = [None] * (max(vocab.values()) + 1)
    if "ByteLevel" in kinds:
        alphabet = _byte_level_alphabet()
        for tok, i in vocab.items():
            if tok not in special:
                try:
                    out[i] = bytes(alphabet[c] for c in tok)
                except KeyError:
                    out[i] = tok.encode("utf-8")
        return out
    if "ByteFallback" in kinds:  # sentencepiece style: <0xE4> byte tokens, "▁" for spaces
        for tok, i in vocab.items():
            if tok in special:
                continue
            if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
                out[i] = bytes([int(tok[3:5], 16)])
            else:
                out[i] = tok.replace("\u2581", " ").encode("utf-8")
        return out
    return None


def _advance(state: int, data: bytes) -> int | None:
    """Continuation bytes still needed after `data`, starting with `state` needed;
    None when data cannot follow."""
    for b in data:
        if state:
            if b & 0xC0 != 0x80:
                return None
            state -= 1
        elif b < 0x80:
            continue
        elif 0xC2 <= b <= 0xDF:
            state = 1
        elif 0xE0 <= b <= 0xEF:
            state = 2
        elif 0xF0 <= b <= 0xF4:
            state = 3
        else:  # a continuation byte with no lead, C0/C1, F5-FF
            return None
    return state


class Utf8Guard:
    """allowed[state, id] and next_state[state, id] for the 4 states (bytes needed)."""

    def __init__(self, pieces: list[bytes | None], vocab_size: int, device: torch.device):
        n = max(vocab_size, len(pieces))
        allowed = np.zeros((4, n), dtype=bool)
        nxt = np.zeros((4, n), dtype=np.int8)
        for i, data in enumerate(pieces):
            for state in range(4):
                if data is None:  # special token: only between characters
                    allowed[state, i] = state == 0
                    continue
                end = _advance(state, data)
                if end is not None:
                    allowed[state, i], nxt[state, i] = True, end
        allowed[0, len(pieces):] = True  # ids past the tokenizer (padding rows of the embedding)
        self.pieces, self.next_state = pieces, nxt
        self.masks = torch.from_numpy(~allowed).to(device)  # True where a token is ruled out

    @classmethod
    def for_tokenizer(cls, tokenizer, vocab_size: int, device: torch.device) -> "Utf8Guard | None":
        pieces = token_bytes(tokenizer)
        return cls(pieces, vocab_size, device) if pieces is not None else None

    def mask(self, logits: torch.Tensor, rows: list[int], states: list[int]) -> torch.Tensor:
        """logits with the ruled-out tokens of `rows` at -inf (a copy)."""
        logits = logits.clone()
        idx = torch.tensor(rows, device=logits.device)
        st = torch.tensor(states, device=logits.device)
        width = logits.shape[-1]
        logits[idx] = logits[idx].masked_fill(self.masks[st][:, :width], float("-inf"))
        return logits


    def _bytes(self, ids: list[int]) -> bytes:
        return b"".join(self.pieces[i] or b"" for i in ids if 0 <= i < len(self.pieces))

    def state_after(self, ids: list[int]) -> int:
        """Continuation bytes missing at the end of these (last few) tokens."""
        data = self._bytes(ids)
        k = incomplete_tail(data)
        return _advance(0, data[-k:]) or 0 if k else 0

    def tail_bytes(self, ids: list[int]) -> int:
        """Bytes of the unfinished character at the end of these (last few) tokens."""
        return incomplete_tail(self._bytes(ids))


def incomplete_tail(data: bytes) -> int:
    """Bytes at the end of `data` that start a character but do not finish it."""
    for k in range(1, min(4, len(data)) + 1):
        b = data[-k]
        if b & 0xC0 == 0x80:
            continue
        need = 1 if 0xC2 <= b <= 0xDF else 2 if 0xE0 <= b <= 0xEF else 3 if 0xF0 <= b <= 0xF4 else 0
        return k if need >= k else 0
    return 0
