"""Inference forward with a KV cache over a batch of left-padded sequences.

Uses the trained Transformer's own modules (weights, norms, RoPE tables), so what is
served is exactly what was trained. Sequences of different lengths share a batch:
prompts are left-padded to a common length, each row has its own RoPE positions
(starting at 0 at its first real token) and a key mask that hides its padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.model import Transformer, apply_rope


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


@torch.no_grad()
def forward_cached(model: Transformer, cache: KVCache, input_ids: torch.Tensor, positions: torch.Tensor,
                   key_valid: torch.Tensor, *, all_logits: bool = False) -> torch.Tensor:
    """Run input_ids (B, T) at cache slots [cache.length, cache.length + T).

    positions (B, T): RoPE position of each token; key_valid (B, S) with S = length + T:
    False for padding slots. Returns fp32 logits (B, T, V) if all_logits else (B, V)
    for the last slot."""
    cfg = model.cfg
    B, T = input_ids.shape
    start, S = cache.length, cache.length + input_ids.shape[1]
    if S > cache.max_len:
        raise ValueError(f"sequence of {S} tokens exceeds the cache of {cache.max_len}")
    cos = model.rope_cos[positions].unsqueeze(1)  # (B, 1, T, D)
    sin = model.rope_sin[positions].unsqueeze(1)  # (B, 1, T, D)
    q_index = torch.arange(start, S, device=input_ids.device)  # (T,)
    k_index = torch.arange(S, device=input_ids.device)  # (S,)
    causal = k_index[None, :] <= q_index[:, None]  # (T, S)
    mask = causal[None] & key_valid[:, None, :S]  # (B, T, S)
    # A padding query would see no key at all (NaN rows); let it see itself.
    mask = mask | (k_index[None, None, :] == q_index[None, :, None])
    mask = mask[:, None]  # (B, 1, T, S)
    rep = cfg.n_heads // cfg.kv_heads
    x = model.tok_embeddings(input_ids)  # (B, T, C)
    for i, layer in enumerate(model.layers):
        att = layer.attention
        h = layer.attention_norm(x)
        q = att.wq(h).view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = att.wk(h).view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = att.wv(h).view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.k[i][:, :, start:S] = k
        cache.v[i][:, :, start:S] = v
        keys, values = cache.k[i][:, :, :S], cache.v[i][:, :, :S]  # (B, K, S, D)
        if rep > 1:
            keys = keys.repeat_interleave(rep, dim=1)  # (B, H, S, D)
            values = values.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, H, T, D)
        x = x + att.wo(y.transpose(1, 2).reshape(B, T, cfg.dim))
        x = x + layer.feed_forward(layer.ffn_norm(x))
    cache.length = S
    h = model.norm(x if all_logits else x[:, -1])
    return model.output(h).float()
