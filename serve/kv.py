"""Inference forward with a KV cache over a batch of left-padded sequences.

Uses the trained Transformer's own weights and RoPE tables, so what is served is
exactly what was trained. Sequences of different lengths share a batch: prompts are
left-padded to a common length, each row has its own RoPE positions (0 at its first
real token) and a key mask that hides its padding.

Decoding is many small steps, and at small batch a step's time is the number of
operations it launches (Python and dispatch on CPU, kernel launches on a GPU), not
arithmetic. So the step is written as few operations as possible: per layer the
weights are plain tensors (no module calls); q/k/v and gate/up are one matmul each
(`prepare_serving` makes the separate Linear weights views of one fused tensor: no
copy, training code unchanged); RoPE rotates q and k together in four operations;
RMSNorm is one fused op; a step slices the cache once for all layers; shared kv heads
are attended without copying them; a decode step needs no causal mask.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from train.model import Transformer


# Attention here always has a key mask (left padding) and a key length that grows by
# one every step. On CUDA, SDPA may pick the cuDNN backend for masked bf16 attention,
# which builds an execution graph for every new shape: hundreds of ms (sglang measured
# ~400 ms per build; mlx notes the rebuild on every longer sequence). Every decode step
# is a new shape, so the cuDNN backend is left out; the memory-efficient kernel takes
# masks without per-shape setup.
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


class KVCache:
    """Keys and values of every layer, one tensor each: (n_layers, B, n_kv_heads,
    max_len, head_dim). Slot t of every row is filled at the same step, so one
    `length` covers the batch, and a forward takes its per-layer views of the slots it
    writes and the keys it reads with one slice for all layers."""

    def __init__(self, model: Transformer, batch: int, max_len: int):
        cfg = model.cfg
        p = next(model.parameters())
        shape = (cfg.n_layers, batch, cfg.kv_heads, max_len, cfg.head_dim)
        # zeros, not empty: a padding slot is masked out, but 0 x NaN would still be NaN
        self.k = torch.zeros(shape, device=p.device, dtype=p.dtype)
        self.v = torch.zeros(shape, device=p.device, dtype=p.dtype)
        self.length = 0
        self.max_len = max_len

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop finished sequences from the batch."""
        self.k, self.v = self.k.index_select(1, rows), self.v.index_select(1, rows)

    def trim_left(self, n: int) -> None:
        """Drop the first n slots of every row (a view; keep_rows then compacts it)."""
        self.k, self.v = self.k[:, :, :, n:], self.v[:, :, :, n:]
        self.length -= n
        self.max_len -= n

    def put_rows(self, row: int, slot: int, other: "KVCache") -> None:
        """Copy other's rows to rows [row, row + len), its slot 0 to slot `slot`."""
        n, length = other.k.shape[1], other.length
        self.k[:, row:row + n, :, slot:slot + length] = other.k[:, :, :, :length]
        self.v[:, row:row + n, :, slot:slot + length] = other.v[:, :, :, :length]


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as training computes it: normalised in fp32, cast back, then scaled."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Training's rotate-half RoPE, x * cos + cat(-x2, x1) * sin, in four operations:
    roll(x) is cat(x2, x1), and the sign sits in the table. Bit-identical."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, -1) * sin_signed


@torch.no_grad()
def forward_cached(model: Transformer, cache: KVCache, input_ids: torch.Tensor, positions: torch.Tensor,
                   key_valid: torch.Tensor, *, all_logits: bool = False) -> torch.Tensor:
    """Run input_ids (B, T) at cache slots [cache.length, cache.length + T).

    positions (B, T): RoPE position of each token; key_valid (B, >= S) with S =
    length + T: False for padding slots. Returns fp32 logits (B, T, V) if all_logits
    else (B, V) for the last slot."""
    cfg = model.cfg
    sw = prepare_serving(model)
    B, T = input_ids.shape
    H, K, D, C = cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.dim
    rep = H // K
    start, S = cache.length, cache.length + T
    if S > cache.max_len:
        raise ValueError(f"sequence of {S} tokens exceeds the cache of {cache.max_len}")
    dtype = cache.k.dtype
    cos = model.rope_cos[positions].unsqueeze(1).to(dtype)  # (B, 1, T, D)
    sin = sw.sin_signed[positions].unsqueeze(1).to(dtype)  # (B, 1, T, D)
    valid = key_valid[:, None, None, :S]  # (B, 1, 1, S)
    if T > 1:
        q_index = torch.arange(start, S, device=input_ids.device)  # (T,)
        k_index = torch.arange(S, device=input_ids.device)  # (S,)
        # causal and not padding; a padding query would see no key at all (NaN rows),
        # so it may see itself
        mask = ((k_index[None, :] <= q_index[:, None]) & valid) | (k_index[None, :] == q_index[:, None])
    else:
        mask = valid  # the newest token may see every real key
    # Query heads sharing a kv head attend as one group of rep*T queries, so the
    # cached keys/values are read in place instead of being repeated per head.
    mask = mask.repeat(1, 1, rep, 1) if rep > 1 and T > 1 else mask  # rows r*T + t -> t: (B, 1, rep*T, S)
    x = F.embedding(input_ids, model.tok_embeddings.weight)  # (B, T, C)
    # per layer: the slots this call writes and the keys/values it reads
    k_new, v_new = cache.k[:, :, :, start:S].unbind(0), cache.v[:, :, :, start:S].unbind(0)
    keys, values = cache.k[:, :, :, :S].unbind(0), cache.v[:, :, :, :S].unbind(0)
    with sdpa_kernel(_CUDA_SDPA) if x.is_cuda else nullcontext():
        for i, (norm1, wqkv, bqkv, wo, bo, norm2, w13, b13, w2, b2) in enumerate(sw.layers):
            qkv = F.linear(_rms(x, norm1, sw.eps), wqkv, bqkv).view(B, T, H + 2 * K, D).transpose(1, 2)
            qk, v = qkv.split((H + K, K), dim=1)
            q, k = _rope(qk, cos, sin).split((H, K), dim=1)  # q and k heads rotated together
            k_new[i].copy_(k)
            v_new[i].copy_(v)
            q = q.reshape(B, K, rep * T, D)  # heads of a group are adjacent: (B, K, rep*T, D)
            y = F.scaled_dot_product_attention(q, keys[i], values[i], attn_mask=mask)  # (B, K, rep*T, D)
            y = y.view(B, H, T, D).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
            x = x + F.linear(y, wo, bo)
            gate, up = F.linear(_rms(x, norm2, sw.eps), w13, b13).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w2, b2)
    cache.length = S
    h = _rms(x if all_logits else x[:, -1], sw.final_norm, sw.eps)
    return F.linear(h, sw.output).float()
