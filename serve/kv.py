"""Inference forward with a KV cache over a batch of left-padded sequences.

Uses the trained Transformer's own weights, norms and RoPE tables, so what is served
is exactly what was trained. Sequences of different lengths share a batch: prompts
are left-padded to a common length, each row has its own RoPE positions (0 at its
first real token) and a key mask that hides its padding.

Decoding is many small steps, so the per-step work is kept lean: q/k/v and
gate/up projections run as one matmul each (`fuse_projections` makes the separate
weights views into one tensor: no copy, training code unchanged), shared kv heads are
attended without copying them, and a decode step needs no causal mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.model import Transformer, apply_rope


@torch.no_grad()
def fuse_projections(model: Transformer) -> None:
    """Store wq|wk|wv and w1|w3 of each layer in one tensor; the original Linear
    weights become views of it (same values, same state-dict names)."""
    for layer in model.layers:
        att, ff = layer.attention, layer.feed_forward
        if getattr(att, "wqkv", None) is not None or att.wq.bias is not None:
            continue  # already fused, or biases (kept on the simple path)
        for owner, names, fused_name in ((att, ("wq", "wk", "wv"), "wqkv"), (ff, ("w1", "w3"), "w13")):
            fused = torch.cat([getattr(owner, n).weight for n in names], dim=0).contiguous()
            start = 0
            for n in names:
                lin = getattr(owner, n)
                rows = lin.weight.shape[0]
                lin.weight = nn.Parameter(fused[start:start + rows], requires_grad=False)
                start += rows
            setattr(owner, fused_name, fused)


class KVCache:
    """Per layer keys/values (B, n_kv_heads, max_len, head_dim); slot t of every row is
    filled at the same step, so one `length` covers the batch."""

    def __init__(self, model: Transformer, batch: int, max_len: int):
        cfg = model.cfg
        p = next(model.parameters())
        shape = (batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in range(cfg.n_layers)]
        self.length = 0
        self.max_len = max_len

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop finished sequences from the batch."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]


def _project(h: torch.Tensor, owner: nn.Module, fused_name: str, names: tuple[str, ...]) -> list[torch.Tensor]:
    fused = getattr(owner, fused_name, None)
    if fused is not None:
        sizes = [getattr(owner, n).weight.shape[0] for n in names]
        return list(F.linear(h, fused).split(sizes, dim=-1))
    return [getattr(owner, n)(h) for n in names]


@torch.no_grad()
def forward_cached(model: Transformer, cache: KVCache, input_ids: torch.Tensor, positions: torch.Tensor,
                   key_valid: torch.Tensor, *, all_logits: bool = False) -> torch.Tensor:
    """Run input_ids (B, T) at cache slots [cache.length, cache.length + T).

    positions (B, T): RoPE position of each token; key_valid (B, >= S) with S =
    length + T: False for padding slots. Returns fp32 logits (B, T, V) if all_logits
    else (B, V) for the last slot."""
    cfg = model.cfg
    B, T = input_ids.shape
    K, rep, D = cfg.kv_heads, cfg.n_heads // cfg.kv_heads, cfg.head_dim
    start, S = cache.length, cache.length + T
    if S > cache.max_len:
        raise ValueError(f"sequence of {S} tokens exceeds the cache of {cache.max_len}")
    cos = model.rope_cos[positions].unsqueeze(1)  # (B, 1, T, D)
    sin = model.rope_sin[positions].unsqueeze(1)  # (B, 1, T, D)
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
    x = model.tok_embeddings(input_ids)  # (B, T, C)
    for i, layer in enumerate(model.layers):
        att = layer.attention
        h = layer.attention_norm(x)
        q, k, v = _project(h, att, "wqkv", ("wq", "wk", "wv"))
        q = q.view(B, T, cfg.n_heads, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.k[i][:, :, start:S] = k
        cache.v[i][:, :, start:S] = v
        keys, values = cache.k[i][:, :, :S], cache.v[i][:, :, :S]  # (B, K, S, D)
        q = q.reshape(B, K, rep * T, D)  # heads of a group are adjacent: (B, K, rep*T, D)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, K, rep*T, D)
        y = y.reshape(B, cfg.n_heads, T, D).transpose(1, 2).reshape(B, T, cfg.dim)  # (B, T, C)
        x = x + att.wo(y)
        ff = layer.feed_forward
        gate, up = _project(layer.ffn_norm(x), ff, "w13", ("w1", "w3"))
        x = x + ff.w2(F.silu(gate) * up)
    cache.length = S
    h = model.norm(x if all_logits else x[:, -1])
    return model.output(h).float()
