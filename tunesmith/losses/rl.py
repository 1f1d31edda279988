"""Online-RL objectives as pure tensor functions: per-token log-probs and entropy, the KL estimators, the
clipped policy surrogate, the clipped value loss, and the aggregation of per-token terms.

Shapes: a rollout is (B, T) over response tokens only, with `mask` 1 on real response tokens (the end-of-turn
token included) and 0 on padding after a response ends.
"""
from __future__ import annotations

from typing import Literal

import torch

Aggregation = Literal["token", "sequence", "constant"]
KLEstimator = Literal["k1", "k2", "k3"]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(tokens[b, t]) under softmax(logits[b, t] / temperature), shape (B, T), float32.

    `logits` (B, T, V) must already be aligned with the tokens they predict. Dividing by the sampling
    temperature makes these the log-probs of the distribution the rollout was drawn from.
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) at every position, (B, T): H = logsumexp(z) - sum p z."""
    z = logits.float() / temperature
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(-1)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from samples of π (Schulman 2020, "Approximating KL divergence").

    With log r = ref_logp - logp:
        k1 = -log r                   unbiased, can be negative, high variance (PPO-RLHF's reward penalty)
        k2 = (log r)^2 / 2            biased, low variance, always >= 0
        k3 = (r - 1) - log r          unbiased, always >= 0 (GRPO's KL term)
    """
    log_ratio = ref_logp - logp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.pow(2)
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1, k2 or k3")


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_eps: float = 0.2,
                      clip_eps_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped policy loss per token (Schulman et al. 2017), and where the clip was active.

        ratio = exp(logp - old_logp)
        loss  = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high))

    `advantages` is (B, T), or (B,) for one advantage per sequence (GRPO), broadcast over tokens.
    `clip_eps_high` (default eps) widens the upper bound alone, as DAPO's clip-higher does. Returns
    (loss (B, T), clipped (B, T) bool: the clipped branch was the larger one, so its gradient is zero).
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    ratio = torch.exp(logp - old_logp)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: float | None = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's value loss per token, with the new value kept within `clip` of the rollout's value:

        loss = 0.5 * max((V - R)^2, (old_V + clip(V - old_V, -c, c) - R)^2)

    Returns (loss (B, T), clipped (B, T) bool). `clip=None` gives the plain 0.5 (V - R)^2.
    """
    plain = (values - returns).pow(2)
    if clip is None:
        return 0.5 * plain, torch.zeros_like(plain, dtype=torch.bool)
    held = old_values + torch.clamp(values - old_values, -clip, clip)
    clipped = (held - returns).pow(2)
    return 0.5 * torch.maximum(plain, clipped), clipped > plain


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: Aggregation = "token",
              width: int | None = None) -> tuple[torch.Tensor, float]:
    """Reduce a (B, T) per-token term to (sum, weight) whose ratio is the loss; summing both over
    micro-batches and dividing once gives the same loss as one big batch.

    token:    every response token weighs the same: sum over tokens / number of tokens (DAPO; a long
              answer's tokens count as much as a short one's, but a batch of long answers weighs each
              token less than a batch of short ones);
    sequence: every response weighs the same: mean over its tokens, then mean over responses (the
              original GRPO and PPO-RLHF: a long answer's tokens each count less);
    constant: sum over tokens / (responses x `width`), `width` the generation budget (default T): every
              token weighs the same in every batch, whatever the lengths (Dr. GRPO, Liu et al. 2025).
    """
    return aggregate_sum(per_token, mask, how), aggregate_weight(mask, how, width)


def aggregate_sum(per_token: torch.Tensor, mask: torch.Tensor, how: Aggregation = "token") -> torch.Tensor:
    """The sum of `aggregate`, left on the device."""
    mask = mask.to(per_token.dtype)
    if how in ("token", "constant"):
        return (per_token * mask).sum()
    if how == "sequence":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum()
    raise ValueError(f"unknown aggregation {how!r}; use token, sequence or constant")


def aggregate_weight(mask: torch.Tensor, how: Aggregation = "token", width: int | None = None) -> float:
    """The weight of `aggregate`, as a number: pass the mask where it is on the host, and the host need not
    wait for the device. Responses count only where the mask keeps a token: one masked out whole (a cut-off
    answer under `mask_truncated`) leaves the weight as it leaves the sum."""
    if how == "token":
        return float(mask.float().sum())
    responses = float((mask.sum(-1) > 0).sum())
    if how == "sequence":
        return responses
    if how == "constant":
        return responses * (width or mask.shape[-1])
    raise ValueError(f"unknown aggregation {how!r}; use token, sequence or constant")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is 1 (0 when the mask is empty)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)
