"""Losses as pure functions (each tested against a reference formula in
tests/train/test_losses.py).

`cross_entropy` is the plain next-token loss on logits. `linear_cross_entropy` fuses
the lm_head matmul with it and works through the tokens in chunks: it never holds the
(N, V) logits of the whole batch, and it computes the gradients of hidden states and
head weight in the same pass (softmax - one_hot is the gradient of the loss w.r.t.
the logits), so the backward is a rescale. With V = 32k that removes the largest
tensor of a small model's step and the separate log-softmax backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _masked_targets(targets: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    if loss_mask is not None:
        targets = targets.masked_fill(loss_mask == 0, IGNORE_INDEX)
    return targets.reshape(-1)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None, *,
                  reduction: str = "mean") -> torch.Tensor:
    """Token cross-entropy in fp32 over kept positions: their sum (reduction="sum", what
    the training loop normalises by the global token count), or sum / max(count, 1)
    rather than a plain mean, so a batch with no kept token gives 0 (with a graph), not
    NaN. logits (B, T, V), targets (B, T) already shifted; IGNORE_INDEX / mask 0 skipped."""
    flat_targets = _masked_targets(targets, loss_mask)  # (B*T,)
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), flat_targets,
                            ignore_index=IGNORE_INDEX, reduction="sum")
    if reduction == "sum":
        return total
    return total / (flat_targets != IGNORE_INDEX).sum().clamp(min=1)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, mean: bool):
        # hidden (N, C), weight (V, C), targets (N,)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid = targets != IGNORE_INDEX  # (N,)
        count = valid.sum().clamp(min=1) if mean else torch.ones((), dtype=torch.long, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, hidden.shape[0], chunk):
            h, t, ok = hidden[s:s + chunk], targets[s:s + chunk], valid[s:s + chunk]
            logits = (h @ weight.t()).float()  # (n, V)
            safe_t = t.clamp(min=0)
            picked = logits.gather(1, safe_t[:, None])[:, 0]
            if not (need_h or need_w):
                total += torch.where(ok, torch.logsumexp(logits, dim=-1) - picked, 0.0).sum()
                continue
            # One exponential pass serves the loss and the gradient (logsumexp and then
            # exp(logits - lse) would run it twice over the (n, V) block; on CPU these
            # element-wise passes are a large part of a small model's step).
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()  # in place: the logits are not needed again
            sum_exp = probs.sum(dim=-1)
            total += torch.where(ok, top[:, 0] + sum_exp.log() - picked, 0.0).sum()
            # d(sum of losses)/d(logits) = softmax - one_hot, zero on ignored rows
            keep = ok.to(probs.dtype)
            probs.mul_((keep / sum_exp)[:, None])
            probs[torch.arange(len(t), device=t.device), safe_t] -= keep
            g = probs.to(hidden.dtype)
            if need_h:
                grad_h[s:s + chunk] = g @ weight
            if need_w:
                grad_w += (g.t() @ h).float()
        ctx.save_for_backward(grad_h if need_h else torch.empty(0), grad_w if need_w else torch.empty(0), count)
        ctx.need, ctx.weight_dtype = (need_h, need_w), weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w, count = ctx.saved_tensors
        scale = grad_out / count
        need_h, need_w = ctx.need
        return ((grad_h * scale.to(grad_h.dtype)) if need_h else None,
                (grad_w * scale).to(ctx.weight_dtype) if need_w else None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         loss_mask: torch.Tensor | None = None, *, chunk: int = 1024,
                         reduction: str = "mean") -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, targets) without materialising all logits.
    hidden (B, T, C), weight (V, C), targets (B, T). Same value and gradients as
    `cross_entropy` with the same reduction (up to float rounding)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    flat = _masked_targets(targets, loss_mask)
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, flat, chunk, reduction == "mean")
