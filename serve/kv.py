"""Inference forward with a KV cache: prefill of right-padded prompts, and decode
steps over a batch whose rows each sit at their own position.

Uses the trained Transformer's own weights and RoPE tables, so what is served is
exactly what was trained. A running sequence owns one row of the cache for its life
and its token t sits in slot t: a sequence joining a running batch is prefilled
straight into a free row (nothing else moves), and a decode step writes each row's
new key at that row's own position.

Decoding is many small steps, and at small batch a step's time is the number of
operations it launches (Python and dispatch on CPU, kernel launches on a GPU), not
arithmetic. So the step is written as few operations as possible: per layer the
weights are plain tensors (no module calls); q/k/v and gate/up are one matmul each
(`prepare_serving` makes the separate Linear weights views of one fused tensor: no
copy, training code unchanged); RoPE rotates q and k together in four operations;
RMSNorm is one fused op; shared kv heads are attended without copying them. And a
decode step's shapes depend only on (rows, key length), all its operations stay on
the device, and it reads its inputs from fixed buffers: on a GPU it is captured once
per shape as a CUDA graph and replayed as one launch (serve/decoder.py).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from train.model import Transformer


# Attention here always has a key mask. On CUDA, SDPA may pick the cuDNN backend for
# masked bf16 attention, which builds an execution graph for every new shape: hundreds
# of ms (sglang measured ~400 ms per build). Eager decoding meets a new key length every
# step, so the cuDNN backend is left out; the memory-efficient kernel takes masks
# without per-shape setup.
_CUDA_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class ServingWeights:
    """What the cached forward reads, as plain tensors."""

    layers: list[tuple]  # per layer: (norm1, wqkv, bqkv, wo, bo, norm2, w13, b13, w2, b2)
    final_norm: torch.Tensor
    output: torch.Tensor
    sin_signed: torch.Tensor  # (T_max, D) fp32: sin with its first half negated (see _rope)
    eps: float


def _fuse(owner: nn.Module, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight tensor for several Linears, which become views of it."""
    linears = [getattr(owner, n) for n in names]
    fused = torch.cat([lin.weight for lin in linears], dim=0).contiguous()
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = nn.Parameter(fused[start:start + rows], requires_grad=False)
        start += rows
    bias = torch.cat([lin.bias for lin in linears]) if linears[0].bias is not None else None
    return fused, bias


@torch.no_grad()
def prepare_serving(model: Transformer) -> ServingWeights:
    """Fuse projections and collect the weights the cached forward uses (once per model)."""
    if getattr(model, "serving", None) is not None:
        return model.serving
    layers = []
    for layer in model.layers:
        att, ff = layer.attention, layer.feed_forward
        wqkv, bqkv = _fuse(att, ("wq", "wk", "wv"))
        w13, b13 = _fuse(ff, ("w1", "w3"))
        layers.append((layer.attention_norm.weight, wqkv, bqkv, att.wo.weight, att.wo.bias,
                       layer.ffn_norm.weight, w13, b13, ff.w2.weight, ff.w2.bias))
    half = model.cfg.head_dim // 2
    sin = model.rope_sin.float()
    sin_signed = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
    model.serving = ServingWeights(layers, model.norm.weight, model.output.weight, sin_signed, model.cfg.norm_eps)
    return model.serving


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


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as training computes it: normalised in fp32, cast back, then scaled."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Training's rotate-half RoPE, x * cos + cat(-x2, x1) * sin, in four operations:
    roll(x) is cat(x2, x1), and the sign sits in the table. Bit-identical."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, -1) * sin_signed


def _ffn(x: torch.Tensor, sw: ServingWeights, norm2, w13, b13, w2, b2) -> torch.Tensor:
    gate, up = F.linear(_rms(x, norm2, sw.eps), w13, b13).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, w2, b2)


def _sdpa_backends(x: torch.Tensor):
    return sdpa_kernel(_CUDA_SDPA) if x.is_cuda else nullcontext()


@torch.no_grad()
def prefill(model: Transformer, cache: SlotCache, row: int, ids: torch.Tensor, lengths: torch.Tensor, *,
            all_logits: bool = False) -> torch.Tensor:
    """Run prompts into cache rows [row, row + m), slots [0, T).

    ids (m, T) right-padded: row i's prompt is ids[i, :lengths[i]] (lengths (m,) on the
    device). Returns fp32 logits (m, T, V) if all_logits, else (m, V) at each prompt's
    last token. Slots past a prompt's end get keys of its padding; decoding overwrites
    them and never attends past its own position."""
    cfg, sw = model.cfg, prepare_serving(model)
    m, T = ids.shape
    H, K, D, C = cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.dim
    rep = H // K
    if T > cache.slots or row + m > cache.rows:
        raise ValueError(f"prefill of {m} x {T} tokens at row {row} does not fit the cache")
    dtype = cache.dtype
    cos, sin = model.rope_cos[:T].to(dtype), sw.sin_signed[:T].to(dtype)  # (T, D): every prompt starts at 0
    idx = torch.arange(T, device=ids.device)
    # causal and not padding; a padding query still sees its prompt's keys (never an empty row: NaN)
    mask = (idx[None, None, :] <= idx[None, :, None]) & (idx[None, None, :] < lengths[:, None, None])  # (m, T, T)
    # Query heads sharing a kv head attend as one group of rep*T queries (rows r*T + t
    # use mask row t), so keys/values are never repeated per head.
    mask = (mask.repeat(1, rep, 1) if rep > 1 else mask)[:, None]  # (m, 1, rep*T, T)
    x = F.embedding(ids, model.tok_embeddings.weight)  # (m, T, C)
    k_slots, v_slots = cache.k[:, row:row + m, :, :T].unbind(0), cache.v[:, row:row + m, :, :T].unbind(0)
    with _sdpa_backends(x):
        for i, (norm1, wqkv, bqkv, wo, bo, *ffn) in enumerate(sw.layers):
            qkv = F.linear(_rms(x, norm1, sw.eps), wqkv, bqkv).view(m, T, H + 2 * K, D).transpose(1, 2)
            qk, v = qkv.split((H + K, K), dim=1)
            q, k = _rope(qk, cos, sin).split((H, K), dim=1)  # q and k heads rotated together
            k_slots[i].copy_(k)
            v_slots[i].copy_(v)
            y = F.scaled_dot_product_attention(q.reshape(m, K, rep * T, D), k, v, attn_mask=mask)
            x = x + F.linear(y.view(m, H, T, D).transpose(1, 2).reshape(m, T, C), wo, bo)
            x = _ffn(x, sw, *ffn)
    if not all_logits:
        x = x[torch.arange(m, device=x.device), lengths - 1]  # (m, C)
    return F.linear(_rms(x, sw.final_norm, sw.eps), sw.output).float()


@torch.no_grad()
def decode(model: Transformer, cache: SlotCache, tokens: torch.Tensor, positions: torch.Tensor,
           key_len: int) -> torch.Tensor:
    """One decode step of cache rows [0, B): tokens (B,) go to slot positions[b] of row
    b, and each attends to slots [0, positions[b]] of its row. Keys are read from slots
    [0, key_len) (key_len > every position). Returns fp32 logits (B, V).

    Shapes depend only on (B, key_len), and nothing here reads a value back to the
    host: on a GPU this function is what a CUDA graph captures."""
    cfg, sw = model.cfg, prepare_serving(model)
    B = tokens.shape[0]
    H, K, D, C = cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.dim
    rep = H // K
    dtype = cache.dtype
    cos = model.rope_cos[positions].to(dtype)[:, None]  # (B, 1, D)
    sin = sw.sin_signed[positions].to(dtype)[:, None]
    mask = (cache.slot_ids[:key_len] <= positions[:, None])[:, None, None]  # (B, 1, 1, key_len)
    dest = (cache.row_base[:B] + positions[:, None]).view(-1)  # (B*K,): row b, head h, slot positions[b]
    x = F.embedding(tokens, model.tok_embeddings.weight)[:, None]  # (B, 1, C)
    # per layer, sliced once for all: the flat cache the new keys go to, the keys read
    k_flat, v_flat = cache.k.view(cfg.n_layers, -1, D).unbind(0), cache.v.view(cfg.n_layers, -1, D).unbind(0)
    keys, values = cache.k[:, :B, :, :key_len].unbind(0), cache.v[:, :B, :, :key_len].unbind(0)  # (B, K, key_len, D)
    with _sdpa_backends(x):
        for i, (norm1, wqkv, bqkv, wo, bo, *ffn) in enumerate(sw.layers):
            qk, v = F.linear(_rms(x, norm1, sw.eps), wqkv, bqkv).view(B, H + 2 * K, D).split((H + K, K), dim=1)
            q, k = _rope(qk, cos, sin).split((H, K), dim=1)  # (B, H, D), (B, K, D)
            k_flat[i].index_copy_(0, dest, k.reshape(B * K, D))
            v_flat[i].index_copy_(0, dest, v.reshape(B * K, D))
            y = F.scaled_dot_product_attention(q.view(B, K, rep, D), keys[i], values[i], attn_mask=mask)  # (B, K, rep, D)
            x = x + F.linear(y.reshape(B, 1, C), wo, bo)
            x = _ffn(x, sw, *ffn)
    return F.linear(_rms(x[:, 0], sw.final_norm, sw.eps), sw.output).float()
