"""The decoder trained by every stage: a Llama-style Transformer built from ModelConfig.

Pre-norm RMSNorm blocks, RoPE on q/k, grouped-query attention through
`F.scaled_dot_product_attention`, SwiGLU MLP, optional tied lm_head. Every piece
follows HF `LlamaForCausalLM` numerically (RoPE in the "rotate_half" layout, RMSNorm
in fp32, kv head j serving query heads j·n_rep … j·n_rep+n_rep-1).

The same forward serves training, evaluation, the serving engine and RL rollouts:
given a `kv_cache` (serve/kv.py makes them), attention writes each layer's new keys
and values into it and attends to what it holds. So a policy being trained is
sampled by exactly the code that trains it. The layout is the one a decode step
wants, natively: q/k/v are one `wqkv` Linear and gate/up one `w13` (one matmul each
instead of three and two); `export_hf` splits them into HF's q/k/v and gate/up, and
`from_hf_state_dict` joins them back.

Shapes: B batch, T sequence, C = dim, H query heads, K kv heads, D head_dim, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from train.losses import IGNORE_INDEX, cross_entropy, linear_cross_entropy  # noqa: F401 (re-exported)
from train.model_config import ModelConfig


# SDPA's enable_gqa exists from torch 2.5.
_NATIVE_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32 and scale after casting back, exactly as LlamaRMSNorm does
    (one fused op when x is fp32 already)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_cache(head_dim: int, seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, D) in fp32; each frequency appears twice (halves layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))
    t = torch.arange(seq_len, dtype=torch.float, device=device)
    freqs = torch.outer(t, inv_freq)  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos(), emb.sin()


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: the table `apply_rope` takes."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x (B, h, T, D); cos/sin_signed (T, D), or (B, 1, T, D) when every row has its own
    positions, already in x's dtype. Pairs element i with i + D/2 (HF rotate_half):
    x * cos + cat(-x2, x1) * sin, written as roll(x) = cat(x2, x1) times the signed
    table (four operations; bit-identical, a sign flip is exact)."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, -1) * sin_signed


def attend(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: tuple[int, int, int],
           mask: torch.Tensor | None = None, kv_cache=None, layer: int = 0, dropout: float = 0.0) -> torch.Tensor:
    """Attention between the wqkv projection and wo: qkv (B, T, (H+2K)·D) -> (B, T, C).

    mask None: causal. Else a bool (B, 1, T, T), True where query t may attend key s
    (packed sequences: causal and inside the same document). With kv_cache, the new
    keys/values go into it and the queries attend to what it returns for this layer,
    under its own mask (see serve/kv.py)."""
    H, K, D = heads
    B, T, _ = qkv.shape
    qkv = qkv.view(B, T, H + 2 * K, D)
    qkv = qkv.view(B, H + 2 * K, 1, D) if T == 1 else qkv.transpose(1, 2)  # (B, H+2K, T, D)
    qk, v = qkv.split((H + K, K), dim=1)
    q, k = apply_rope(qk, cos, sin).split((H, K), dim=1)  # q and k rotated together: (B, H|K, T, D)
    if kv_cache is not None:
        keys, values = kv_cache.update(layer, k, v)  # (B, K, S, D)
        # Query heads sharing a kv head attend as one group of rep*T queries (row
        # r*T + t is query t of head r of the group), so keys are never repeated.
        y = F.scaled_dot_product_attention(q.reshape(B, K, (H // K) * T, D), keys, values,
                                           attn_mask=kv_cache.mask)  # (B, K, rep*T, D)
    else:
        gqa = {}
        if K != H:
            if _NATIVE_GQA and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
                gqa = {"enable_gqa": True}  # flash/cuDNN kernels read shared kv heads directly
            else:
                # Elsewhere enable_gqa can fall back to the slow math kernel: materialise
                # the shared kv heads (the copy is small next to q).
                k = k.repeat_interleave(H // K, dim=1)  # (B, H, T, D)
                v = v.repeat_interleave(H // K, dim=1)  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=dropout, **gqa)  # (B, H, T, D)
    # heads back to channels; one token per row (a decode step) needs no transpose
    return y.reshape(B, T, H * D) if T == 1 else y.reshape(B, H, T, D).transpose(1, 2).reshape(B, T, H * D)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """The w13 projection (B, T, 2F), gate rows first -> silu(gate) * up (B, T, F)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads = (cfg.n_heads, cfg.kv_heads, cfg.head_dim)
        self.dropout = cfg.dropout
        # rows: H query heads, then K key heads, then K value heads, D rows each
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=cfg.bias)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        y = self.wo(attend(self.wqkv(x), cos, sin, self.heads, mask, dropout=p))  # (B, T, C)
        return F.dropout(y, p, True) if p else y


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate x) * up x), gate and up as one `w13` Linear (gate rows
    first), down = `w2`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=cfg.bias)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.w2(swiglu(self.w13(x)))  # (B, T, C)
        return F.dropout(y, self.dropout, self.training) if self.dropout else y


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask)  # (B, T, C)
        return x + self.feed_forward(self.ffn_norm(x))  # (B, T, C)

    def weights(self) -> tuple:
        """What `cached_block` reads: (norm1, wqkv, bqkv, wo, bo, norm2, w13, b13, w2, b2)."""
        att, ff = self.attention, self.feed_forward
        return (self.attention_norm.weight, att.wqkv.weight, att.wqkv.bias, att.wo.weight, att.wo.bias,
                self.ffn_norm.weight, ff.w13.weight, ff.w13.bias, ff.w2.weight, ff.w2.bias)


def cached_block(x: torch.Tensor, w: tuple, cos: torch.Tensor, sin: torch.Tensor, heads: tuple[int, int, int],
                 eps: float, kv_cache, layer: int) -> torch.Tensor:
    """Block.forward for KV-cached inference, on the block's weights fetched once.
    A decode step is hundreds of tiny operations; nn.Module calls and attribute
    lookups (about 20 a layer) cost 0.2 ms of a 1.1 ms step on a small model on CPU,
    so the cached path composes the same pieces (rms_norm, attend, swiglu) with plain
    F.linear. No dropout, no hooks: inference on full (not ZeRO-3 partitioned) weights."""
    norm1, wqkv, bqkv, wo, bo, norm2, w13, b13, w2, b2 = w
    x = x + F.linear(attend(F.linear(rms_norm(x, norm1, eps), wqkv, bqkv), cos, sin, heads,
                            kv_cache=kv_cache, layer=layer), wo, bo)  # (B, T, C)
    return x + F.linear(swiglu(F.linear(rms_norm(x, norm2, eps), w13, b13)), w2, b2)  # (B, T, C)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False  # set True to recompute each block in backward
        # Loss fused with the lm_head, chunked (train/losses.py); off under torch.compile,
        # whose own fusion of the plain path is faster.
        self.fused_loss = True
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Non-persistent: rebuilt from the config, never saved, so checkpoints hold only
        # weights. Computed in fp32; a bf16 cast of the module rounds them the same way
        # HF rounds its on-the-fly cos/sin.
        cos, sin = rope_cache(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (T_max, D)
        self.register_buffer("rope_sin", signed_sin(sin), persistent=False)  # (T_max, D), see apply_rope
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2L) (GPT-2), zero
        biases, unit norms. Also rebuilds the RoPE buffers, so a model created on the
        meta device and moved with `to_empty()` can call this to become usable."""
        std = 0.02
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        resid_std = std / math.sqrt(2 * self.cfg.n_layers)
        for layer in self.layers:
            nn.init.normal_(layer.attention.wo.weight, mean=0.0, std=resid_std)
            nn.init.normal_(layer.feed_forward.w2.weight, mean=0.0, std=resid_std)
        cos, sin = rope_cache(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta,
                              device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(signed_sin(sin))

    def rope_tables_fp32(self) -> "Transformer":
        """Keep the RoPE tables fp32 after the module is cast (they are rounded to the
        activations' dtype per call, as HF rounds its on-the-fly cos/sin)."""
        self.rope_cos, self.rope_sin = self.rope_cos.float(), self.rope_sin.float()
        return self

    def forward_hidden(self, input_ids: torch.Tensor, *, positions: torch.Tensor | None = None,
                       doc_ids: torch.Tensor | None = None, kv_cache=None) -> torch.Tensor:
        """input_ids (B, T) -> final-norm hidden states (B, T, C) (reward/value heads).

        Packed rows (several documents in one row) pass positions (B, T), each
        document counting from 0, and doc_ids (B, T): a token attends only to earlier
        tokens of its own document, so each document is computed exactly as if alone.
        kv_cache: a view of a KV cache (serve/kv.py) with `update(layer, k, v) -> (keys,
        values)` and its attention `mask`; positions (B, T) then say where each new
        token sits (None: every row starts at 0)."""
        B, T = input_ids.shape
        if T > self.cfg.max_seq_len and positions is None:
            # (packed rows may be longer than the context: each document's positions are what count)
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.cfg.max_seq_len}")
        x = self.tok_embeddings(input_ids)  # (B, T, C)
        if self.cfg.dropout:
            x = F.dropout(x, self.cfg.dropout, self.training)
        if positions is None:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, D)
        else:
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]  # (B, 1, T, D)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        mask = None
        if doc_ids is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            mask = ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]  # (B, 1, T, T)
        if kv_cache is not None:
            heads, eps = (self.cfg.n_heads, self.cfg.kv_heads, self.cfg.head_dim), self.cfg.norm_eps
            for i, w in enumerate(self._layer_weights()):
                x = cached_block(x, w, cos, sin, heads, eps, kv_cache, i)
            return rms_norm(x, self.norm.weight, eps)  # (B, T, C)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        return self.norm(x)  # (B, T, C)

    def _layer_weights(self) -> list[tuple]:
        """Every block's weights (the Parameters themselves, no copies), fetched once;
        fetched again when a parameter was replaced rather than updated in place."""
        cached = self.__dict__.get("_weights_cache")
        if cached is None or cached[0][1] is not self.layers[0].attention.wqkv.weight:
            cached = self.__dict__["_weights_cache"] = [layer.weights() for layer in self.layers]
        return cached

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., C) -> logits (..., V) in the model's dtype."""
        return self.output(hidden)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        loss_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        reduction: str = "mean",
        kv_cache=None,
    ):
        """input_ids (B, T) -> logits (B, T, V), or (logits, loss) when targets (B, T) are
        given. targets are already shifted (targets[:, t] is the token after t);
        IGNORE_INDEX (-100) and loss_mask == 0 positions do not count; reduction "sum"
        gives the summed loss the training loop normalises itself. With `fused_loss`
        (training) the logits are never materialised: (None, loss). positions/doc_ids:
        packed rows, kv_cache: decoding (see forward_hidden)."""
        h = self.forward_hidden(input_ids, positions=positions, doc_ids=doc_ids, kv_cache=kv_cache)  # (B, T, C)
        weight = self.output.weight
        if targets is not None and self.fused_loss and weight.numel() > 0:
            # ZeRO-3 partitions weights (numel 0 outside the module's own forward):
            # then the plain path below gathers it through self.output.
            return None, linear_cross_entropy(h, weight, targets, loss_mask, reduction=reduction)
        logits = self.output(h)  # (B, T, V)
        if targets is None:
            return logits
        return logits, cross_entropy(logits, targets, loss_mask, reduction=reduction)
