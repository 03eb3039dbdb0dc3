"""The decoder trained by every stage: a Llama-style Transformer built from ModelConfig.

Pre-norm RMSNorm blocks, RoPE on q/k, grouped-query attention through
`F.scaled_dot_product_attention`, SwiGLU MLP, optional tied lm_head. Every piece
follows HF `LlamaForCausalLM` numerically (RoPE in the "rotate_half" layout, RMSNorm
in fp32, kv head j serving query heads j·n_rep … j·n_rep+n_rep-1), so `export_hf`
only renames tensors: no q/k permutation, no fused weights to split.

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

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and scale after casting back, exactly as LlamaRMSNorm does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cache(head_dim: int, seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, D) in fp32; each frequency appears twice (halves layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))
    t = torch.arange(seq_len, dtype=torch.float, device=device)
    freqs = torch.outer(t, inv_freq)  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, h, T, D); cos/sin (T, D), or (B, 1, T, D) when every row has its own
    positions. Pairs element i with i + D/2 (HF rotate_half)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        kv_dim = self.n_kv_heads * self.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)
        self.wk = nn.Linear(cfg.dim, kv_dim, bias=cfg.bias)
        self.wv = nn.Linear(cfg.dim, kv_dim, bias=cfg.bias)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """mask None: causal. Else a bool (B, 1, T, T), True where query t may attend
        key s (packed sequences: causal and inside the same document)."""
        B, T, C = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = {}
        if self.n_kv_heads != self.n_heads:
            if _NATIVE_GQA and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
                gqa = {"enable_gqa": True}  # flash/cuDNN kernels read shared kv heads directly
            else:
                # Elsewhere enable_gqa can fall back to the slow math kernel: materialise
                # the shared kv heads (the copy is small next to q).
                rep = self.n_heads // self.n_kv_heads
                k = k.repeat_interleave(rep, dim=1)  # (B, H, T, D)
                v = v.repeat_interleave(rep, dim=1)  # (B, H, T, D)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=self.dropout if self.training else 0.0, **gqa
        )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.wo(y))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 = gate, w3 = up, w2 = down."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.bias)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.bias)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))  # (B, T, C)


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


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False  # set True to recompute each block in backward
        # Loss fused with the lm_head, chunked (train/losses.py); off under torch.compile,
        # whose own fusion of the plain path is faster.
        self.fused_loss = True
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
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
        self.register_buffer("rope_sin", sin, persistent=False)  # (T_max, D)
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
        self.rope_sin.copy_(sin)

    def forward_hidden(self, input_ids: torch.Tensor, *, positions: torch.Tensor | None = None,
                       doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> final-norm hidden states (B, T, C) (reward/value heads).

        Packed rows (several documents in one row) pass positions (B, T), each
        document counting from 0, and doc_ids (B, T): a token attends only to earlier
        tokens of its own document, so each document is computed exactly as if alone."""
        B, T = input_ids.shape
        if T > self.cfg.max_seq_len and positions is None:
            # (packed rows may be longer than the context: each document's positions are what count)
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.cfg.max_seq_len}")
        if positions is None:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, D)
        else:
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]  # (B, 1, T, D)
        mask = None
        if doc_ids is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            mask = ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]  # (B, 1, T, T)
        x = self.dropout(self.tok_embeddings(input_ids))  # (B, T, C)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        return self.norm(x)  # (B, T, C)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        loss_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        reduction: str = "mean",
    ):
        """input_ids (B, T) -> logits (B, T, V), or (logits, loss) when targets (B, T) are
        given. targets are already shifted (targets[:, t] is the token after t);
        IGNORE_INDEX (-100) and loss_mask == 0 positions do not count; reduction "sum"
        gives the summed loss the training loop normalises itself. With `fused_loss`
        (training) the logits are never materialised: (None, loss). positions/doc_ids:
        packed rows (see forward_hidden)."""
        h = self.forward_hidden(input_ids, positions=positions, doc_ids=doc_ids)  # (B, T, C)
        weight = self.output.weight
        if targets is not None and self.fused_loss and weight.numel() > 0:
            # ZeRO-3 partitions weights (numel 0 outside the module's own forward):
            # then the plain path below gathers it through self.output.
            return None, linear_cross_entropy(h, weight, targets, loss_mask, reduction=reduction)
        logits = self.output(h)  # (B, T, V)
        if targets is None:
            return logits
        return logits, cross_entropy(logits, targets, loss_mask, reduction=reduction)
