"""The KV cache the serving engine (and RL rollouts) decode with: prefill of right-
padded prompts, and decode steps over a batch whose rows each sit at their own
position.

The forward is the trained Transformer's own (`forward_hidden(..., kv_cache=view)`):
what is served is exactly what was trained, and a policy being trained can be
sampled by the code that trains it. This module owns only the cache and the two
views the model writes into and attends through. A running sequence owns one row of
the cache for its life and its token t sits in slot t: a sequence joining a running
batch is prefilled straight into a free row (nothing else moves), and a decode step
writes each row's new key at that row's own position.

Decoding is many small steps, and at small batch a step's time is the number of
operations it launches (Python and dispatch on CPU, kernel launches on a GPU), not
arithmetic. The model's layout keeps a step short (q/k/v and gate/up one matmul each,
RoPE on q and k together, fused RMSNorm, shared kv heads attended without copies),
and a decode step's shapes depend only on (rows, key length), all its operations stay
on the device, and it reads its inputs from fixed buffers: on a GPU it is captured
once per shape as a CUDA graph and replayed as one launch (serve/decoder.py).
"""

from __future__ import annotations

from contextlib import nullcontext
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from train.model import Transformer


# Attention here always has a key mask. On CUDA, SDPA may pick the cuDNN backend for
# masked bf16 attention, which builds an execution graph for every new shape: hundreds
# of ms (sglang measured ~400 ms per build). Eager decoding meets a new key length every
# step, so the cuDNN backend is left out; the memory-efficient kernel takes masks
# without per-shape setup.
_CUDA_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class SlotCache:
    """Keys and values of every layer, one tensor each: (n_layers, rows, n_kv_heads,
    slots, head_dim). A running sequence owns one row; its token t is in slot t.

    Rows and slots grow by doubling (slots up to the model's context) and are never
    given back, so a long-lived server allocates a few times and then keeps the same
    tensors, whose addresses CUDA graphs of the decode step hold. `version` counts the
    reallocations."""

    def __init__(self, model: Transformer, rows: int = 1, slots: int = 64):
        cfg = model.cfg
        p = next(model.parameters())
        self.layout = (cfg.n_layers, cfg.kv_heads, cfg.head_dim)
        self.context = cfg.max_seq_len
        self.device, self.dtype = p.device, p.dtype
        self.k = self.v = None
        self.version = 0
        self._allocate(next_pow2(rows), min(self.context, next_pow2(slots)))

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    @property
    def slots(self) -> int:
        return self.k.shape[3]

    def _allocate(self, rows: int, slots: int) -> None:
        n_layers, kv_heads, head_dim = self.layout
        shape = (n_layers, rows, kv_heads, slots, head_dim)
        # zeros, not empty: a slot past a row's end is masked out, but 0 x NaN would still be NaN
        k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        if self.k is not None:
            k[:, :self.rows, :, :self.slots] = self.k
            v[:, :self.rows, :, :self.slots] = self.v
        self.k, self.v = k, v
        # what a decode step indexes with, made once: slot numbers, and where slot 0 of
        # row r, kv head h is in a layer's cache viewed as (rows * kv_heads * slots, head_dim)
        self.slot_ids = torch.arange(slots, device=self.device)
        self.row_base = ((torch.arange(rows, device=self.device)[:, None] * kv_heads
                          + torch.arange(kv_heads, device=self.device)) * slots)  # (rows, kv_heads)
        self.version += 1

    def reserve(self, rows: int, slots: int) -> None:
        """Room for `rows` rows of `slots` tokens each."""
        if slots > self.context:
            raise ValueError(f"a sequence of {slots} tokens exceeds the model's context of {self.context}")
        if rows > self.rows or slots > self.slots:
            self._allocate(max(self.rows, next_pow2(rows)), max(self.slots, min(self.context, next_pow2(slots))))

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Row src's first `length` slots to row dst (a sequence changing rows)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


def _sdpa_backends(x: torch.Tensor):
    return sdpa_kernel(_CUDA_SDPA) if x.is_cuda else nullcontext()


class _PrefillView:
    """Prompts going into cache rows [row, row + m), slots [0, T): each layer's keys
    are copied into the cache and attended to as they are, under a causal mask that
    also hides each prompt's padding."""

    def __init__(self, cache: SlotCache, row: int, lengths: torch.Tensor, T: int, rep: int):
        m = lengths.shape[0]
        self.k = cache.k[:, row:row + m, :, :T].unbind(0)  # per layer (m, K, T, D)
        self.v = cache.v[:, row:row + m, :, :T].unbind(0)
        idx = torch.arange(T, device=lengths.device)
        # causal and not padding; a padding query still sees its prompt's keys (never an empty row: NaN)
        mask = (idx[None, None, :] <= idx[None, :, None]) & (idx[None, None, :] < lengths[:, None, None])  # (m, T, T)
        # a group of rep query heads attends as rep*T queries: row r*T + t uses mask row t
        self.mask = (mask.repeat(1, rep, 1) if rep > 1 else mask)[:, None]  # (m, 1, rep*T, T)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.k[layer].copy_(k)
        self.v[layer].copy_(v)
        return k, v


class _DecodeView:
    """One new token per row b in [0, B), written to slot positions[b] of row b; each
    row attends to its slots [0, positions[b]] among the first key_len."""

    def __init__(self, cache: SlotCache, positions: torch.Tensor, key_len: int):
        B = positions.shape[0]
        n_layers, _, D = cache.layout
        self.B, self.D = B, D
        self.mask = (cache.slot_ids[:key_len] <= positions[:, None])[:, None, None]  # (B, 1, 1, key_len)
        self.dest = (cache.row_base[:B] + positions[:, None]).view(-1)  # (B*K,): row b, head h, slot positions[b]
        # per layer, sliced once for all: the flat cache the new keys go to, the keys read
        self.k_flat, self.v_flat = cache.k.view(n_layers, -1, D).unbind(0), cache.v.view(n_layers, -1, D).unbind(0)
        self.keys = cache.k[:, :B, :, :key_len].unbind(0)  # per layer (B, K, key_len, D)
        self.values = cache.v[:, :B, :, :key_len].unbind(0)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.k_flat[layer].index_copy_(0, self.dest, k.reshape(-1, self.D))  # k (B, K, 1, D)
        self.v_flat[layer].index_copy_(0, self.dest, v.reshape(-1, self.D))
        return self.keys[layer], self.values[layer]


@torch.no_grad()
def prefill(model: Transformer, cache: SlotCache, row: int, ids: torch.Tensor, lengths: torch.Tensor, *,
            all_logits: bool = False) -> torch.Tensor:
    """Run prompts into cache rows [row, row + m), slots [0, T).

    ids (m, T) right-padded: row i's prompt is ids[i, :lengths[i]] (lengths (m,) on the
    device). Returns fp32 logits (m, T, V) if all_logits, else (m, V) at each prompt's
    last token. Slots past a prompt's end get keys of its padding; decoding overwrites
    them and never attends past its own position."""
    cfg = model.cfg
    m, T = ids.shape
    if T > cache.slots or row + m > cache.rows:
        raise ValueError(f"prefill of {m} x {T} tokens at row {row} does not fit the cache")
    view = _PrefillView(cache, row, lengths, T, cfg.n_heads // cfg.kv_heads)
    with _sdpa_backends(ids):
        h = model.forward_hidden(ids, kv_cache=view)  # (m, T, C): every prompt starts at position 0
    if not all_logits:
        h = h[torch.arange(m, device=h.device), lengths - 1]  # (m, C)
    return model.logits(h).float()


@torch.no_grad()
def decode(model: Transformer, cache: SlotCache, tokens: torch.Tensor, positions: torch.Tensor,
           key_len: int) -> torch.Tensor:
    """One decode step of cache rows [0, B): tokens (B,) go to slot positions[b] of row
    b, and each attends to slots [0, positions[b]] of its row. Keys are read from slots
    [0, key_len) (key_len > every position). Returns fp32 logits (B, V).

    Shapes depend only on (B, key_len), and nothing here reads a value back to the
    host: on a GPU this function is what a CUDA graph captures."""
    view = _DecodeView(cache, positions, key_len)
    with _sdpa_backends(tokens):
        h = model.forward_hidden(tokens[:, None], positions=positions[:, None], kv_cache=view)  # (B, 1, C)
    return model.logits(h[:, 0]).float()
