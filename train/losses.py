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
    if reduction == "none":
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), flat_targets, ignore_index=IGNORE_INDEX,
                               reduction="none").view(targets.shape)
    return total / (flat_targets != IGNORE_INDEX).sum().clamp(min=1)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul on x in (x's own without autocast): an
    autograd Function's backward runs outside autocast, so it is fixed in forward."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, mean: bool):
        # hidden (N, C), weight (V, C), targets (N,). Only rows with a target are
        # computed (an SFT row's prompt, padding: no logits, zero gradient).
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rows = (targets != IGNORE_INDEX).nonzero()[:, 0]
        count = rows.numel() if mean else 1
        dt = _compute_dtype(hidden)
        w = weight.to(dt)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, rows.numel(), chunk):
            idx = rows[s:s + chunk]
            h, t = hidden.index_select(0, idx).to(dt), targets.index_select(0, idx)
            logits = (h @ w.t()).float()  # (n, V)
            picked = logits.gather(1, t[:, None])[:, 0]
            if not (need_h or need_w):
                total += (torch.logsumexp(logits, dim=-1) - picked).sum()
                continue
            # One exponential pass serves the loss and the gradient (logsumexp and then
            # exp(logits - lse) would run it twice over the (n, V) block; on CPU these
            # element-wise passes are a large part of a small model's step).
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()  # in place: the logits are not needed again
            sum_exp = probs.sum(dim=-1)
            total += (top[:, 0] + sum_exp.log() - picked).sum()
            # d(sum of losses)/d(logits) = softmax - one_hot
            probs.div_(sum_exp[:, None])
            probs[torch.arange(len(t), device=t.device), t] -= 1.0
            g = probs.to(dt)
            if need_h:
                grad_h.index_copy_(0, idx, (g @ w).to(hidden.dtype))
            if need_w:
                grad_w += (g.t() @ h).float()
        ctx.save_for_backward(grad_h if need_h else torch.empty(0), grad_w if need_w else torch.empty(0))
        ctx.need, ctx.weight_dtype, ctx.count = (need_h, need_w), weight.dtype, max(count, 1)
        return total / max(count, 1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_out / ctx.count
        need_h, need_w = ctx.need
        return ((grad_h * scale.to(grad_h.dtype)) if need_h else None,
                (grad_w * scale).to(ctx.weight_dtype) if need_w else None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         loss_mask: torch.Tensor | None = None, *, chunk: int = 1024,
                         reduction: str = "mean") -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, targets) without materialising all logits.
    hidden (B, T, C), weight (V, C), targets (B, T). Same value and gradients as
    `cross_entropy` with the same reduction (up to float rounding)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    flat = _masked_targets(targets, loss_mask)
    if reduction == "none":  # per-token losses (B, T), 0 where ignored
        return -token_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, flat).view(targets.shape)
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, flat, chunk, reduction == "mean")


# ----------------------------------------------------------------- per token, per sequence

class _TokenLogprobs(torch.autograd.Function):
    """log p(target) of the rows that have one, (n,) in fp32. The softmax of each chunk
    is computed once in forward; backward turns it into d logp / d logits = one_hot -
    softmax scaled by the incoming gradient, in place, then the two matmuls. The
    softmax is kept for backward when all rows fit one chunk (the memory a chunk
    takes anyway) and recomputed chunk by chunk otherwise."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, grad: bool):
        dt = _compute_dtype(hidden)
        w = weight.to(dt)
        keep_probs = grad and hidden.shape[0] <= chunk
        out, lse_all, saved = [], [], []
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden[s:s + chunk].to(dt), targets[s:s + chunk]
            logits = (h @ w.t()).float()  # (n, V)
            picked = logits.gather(1, t[:, None])[:, 0]
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()
            sum_exp = probs.sum(dim=-1)
            lse = top[:, 0] + sum_exp.log()
            out.append(picked - lse)
            lse_all.append(lse)
            if keep_probs:
                saved.append(probs.div_(sum_exp[:, None]))
        ctx.chunk, ctx.dt, ctx.weight_dtype = chunk, dt, weight.dtype
        empty = hidden.new_zeros(0, dtype=torch.float32)
        if grad:
            ctx.save_for_backward(hidden, weight, targets, torch.cat(lse_all) if lse_all else empty, *saved)
        return torch.cat(out) if out else empty

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, targets, lse, *saved = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        dt, chunk = ctx.dt, ctx.chunk
        w = weight.to(dt)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for k, s in enumerate(range(0, hidden.shape[0], chunk)):
            h, t, g = hidden[s:s + chunk].to(dt), targets[s:s + chunk], grad_out[s:s + chunk].float()
            probs = saved[k] if saved else ((h @ w.t()).float().sub_(lse[s:s + chunk, None]).exp_())
            probs.mul_(-g[:, None])  # d(g . logp)/d logits = g * (one_hot - softmax)
            probs[torch.arange(len(t), device=t.device), t] += g
            d = probs.to(dt)
            if need_h:
                grad_h[s:s + chunk] = (d @ w).to(hidden.dtype)
            if need_w:
                grad_w += (d.t() @ h).float()
        return grad_h, (grad_w.to(ctx.weight_dtype) if need_w else None), None, None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                   chunk: int = 1024) -> torch.Tensor:
    """log p(target) of every position in fp32, 0 where the target is IGNORE_INDEX.
    hidden (N, C), weight (V, C), targets (N,) -> (N,). Only positions with a target
    are computed (an answer's prompt and padding cost nothing), chunk by chunk, so the
    (N, V) logits never exist at once."""
    rows = (targets != IGNORE_INDEX).nonzero()[:, 0]
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    lp = _TokenLogprobs.apply(hidden.index_select(0, rows), weight, targets.index_select(0, rows), chunk, grad)
    return hidden.new_zeros(hidden.shape[0], dtype=torch.float32).index_put((rows,), lp)


def sequence_sums(values: torch.Tensor, seq_ids: torch.Tensor, n: int) -> torch.Tensor:
    """Sum of values (B, T) per sequence id (B, T) in [0, n) (-1: none) -> (n,)."""
    keep = seq_ids >= 0
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, seq_ids[keep], values[keep])


# ----------------------------------------------------------------- preference losses

def reward_pair_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None, *,
                     center: float = 0.0) -> torch.Tensor:
    """Pairwise (Bradley-Terry) reward-model loss per pair: -log sigmoid(r_c - r_r - margin),
    plus center * (r_c + r_r)^2, which keeps scores near 0 (trl's center_rewards_coefficient
    term; its mean over pairs is trl's). chosen, rejected, margin (P,) -> (P,)."""
    diff = chosen - rejected - (margin if margin is not None else 0.0)
    loss = -F.logsigmoid(diff)
    return loss + center * (chosen + rejected) ** 2 if center else loss


DPO_LOSSES = ("sigmoid", "cdpo", "robust", "ipo", "simpo")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor | None,
             ref_rejected: torch.Tensor | None, *, beta: float, kind: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
             simpo_gamma: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards (chosen, rejected), all (P,). Inputs are
    sequence log-probabilities summed over the response tokens.

      sigmoid  DPO: -log sigmoid(beta * ((pc - rc) - (pr - rr)))
      cdpo     conservative DPO, labels flipped with probability eps (label_smoothing):
               -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)
      robust   rDPO: the cdpo terms, unbiased: ((1 - eps) l(d) - eps l(-d)) / (1 - 2 eps)
      ipo      IPO on per-token log ratios (sums / response tokens): (d_avg - 1 / (2 beta))^2
      simpo    SimPO, no reference: mean log-probs (sums / tokens), margin gamma:
               -(1 - eps) log sigmoid(beta (avg_c - avg_r) - gamma) - eps log sigmoid(-(...))
    """
    if kind not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss {kind!r}; one of {', '.join(DPO_LOSSES)}")
    if kind == "simpo":
        avg_c, avg_r = policy_chosen / chosen_tokens.clamp(min=1), policy_rejected / rejected_tokens.clamp(min=1)
        z = beta * (avg_c - avg_r) - simpo_gamma
        loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
        return loss, beta * avg_c.detach(), beta * avg_r.detach()
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    d = chosen_ratio - rejected_ratio
    if kind == "sigmoid":
        loss = -F.logsigmoid(beta * d)
    elif kind == "cdpo":
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * d) - label_smoothing * F.logsigmoid(-beta * d)
    elif kind == "robust":
        loss = (-(1 - label_smoothing) * F.logsigmoid(beta * d) + label_smoothing * F.logsigmoid(-beta * d)) \
            / (1 - 2 * label_smoothing)
    else:  # ipo
        d_avg = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        loss = (d_avg - 1 / (2 * beta)) ** 2
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# ----------------------------------------------------------------- online RL (GRPO, PPO)
# Per-token tensors are (N, L): N sampled responses, L response positions, `mask` 1 on
# the response's own tokens (its <|im_end|> included), 0 on padding.

RL_BASELINES = ("grpo", "rloo", "reinforce++")


def group_advantages(rewards: torch.Tensor, group: int, kind: str = "grpo", eps: float = 1e-6) -> torch.Tensor:
    """rewards (N,), N = prompts x group with each prompt's samples adjacent -> (N,).
    grpo: (r - group mean) / (group std + eps); rloo: r - mean of the group's other
    samples (leave-one-out); reinforce++: r - group mean, whitened over the whole
    batch (REINFORCE++'s global normalisation)."""
    if kind not in RL_BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; choose from {', '.join(RL_BASELINES)}")
    r = rewards.float().view(-1, group)  # (P, G)
    mean = r.mean(dim=1, keepdim=True)
    if kind == "grpo":
        std = r.std(dim=1, keepdim=True, unbiased=True) if group > 1 else torch.zeros_like(mean)
        return ((r - mean) / (std + eps)).view(-1)
    if kind == "rloo":
        if group < 2:
            raise ValueError("the rloo baseline needs at least 2 samples per prompt")
        return (group / (group - 1) * (r - mean)).view(-1)  # r - (sum - r) / (G - 1)
    centred = (r - mean).view(-1)
    return (centred - centred.mean()) / (centred.std() + eps) if centred.numel() > 1 else centred


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs.
    k1: logp - ref (unbiased, can be negative); k3: exp(ref - logp) - (ref - logp) - 1
    (unbiased, always >= 0, lower variance; GRPO's choice)."""
    if kind == "k1":
        return logp - ref_logp
    if kind == "k3":
        d = (ref_logp - logp).clamp(-20, 20)  # exp of a large gap would overflow
        return torch.exp(d) - d - 1
    raise ValueError(f"unknown KL estimator {kind!r}; choose k1 or k3")


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token: -min(ρA, clip(ρ, 1-ε, 1+ε)A), ρ = exp(logp -
    old). advantages (N, L) or (N, 1). Returns (loss (N, L), clipped (N, L) bool)."""
    ratio = torch.exp(logp - old_logp)
    unclipped, clipped = ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each response. rewards, values, mask (N, L)
    (values of positions past the end are ignored: the episode ends at the last masked
    token). Returns (advantages, returns) (N, L), 0 outside the mask."""
    N, L = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(N, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(last)
    for t in reversed(range(L)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = torch.where(m > 0, delta + gamma * lam * last, torch.zeros_like(last))
        next_value = torch.where(m > 0, values[:, t], torch.zeros_like(last))
        adv[:, t] = last
    return adv * mask, (adv + values) * mask


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """x standardised over its masked entries (advantage whitening), 0 outside."""
    n = mask.sum().clamp(min=1)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: float) -> torch.Tensor:
    """PPO's value loss per token: 0.5 max((V - R)^2, (V_old + clip(V - V_old, ±ε) - R)^2)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
