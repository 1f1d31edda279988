"""Advantage estimators and the KL coefficient controller of online RL (pure tensor functions).

Sequence-level scores are (N,) with the G samples of one prompt adjacent (N = prompts x G); token-level
terms are (N, T) over response tokens with `mask` 1 on real tokens.
"""
from __future__ import annotations

import math

import torch


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (population std); `shift_mean=False` only rescales.
    Masked-out entries come back as 0."""
    m = torch.ones_like(x) if mask is None else mask.to(x.dtype)
    n = m.sum().clamp(min=1)
    mean = (x * m).sum() / n
    var = ((x - mean).pow(2) * m).sum() / n
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded responses.

        δ_t = r_t + γ V_{t+1} - V_t            (V past the last real token is 0: the episode ended)
        A_t = δ_t + γ λ A_{t+1}
        returns_t = A_t + V_t

    rewards, values, mask: (N, T). Returns (advantages, returns), both 0 where mask is 0.
    """
    m = mask.to(values.dtype)
    values = values * m
    n_steps = rewards.shape[1]
    adv = torch.zeros_like(values)
    next_adv = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(n_steps)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]
        adv[:, t] = next_adv
        next_value = values[:, t]
    return adv, (adv + values) * m


def group_advantages(scores: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (Shao et al. 2024): each sample's score minus its group's mean, divided by the group's std
    (unbiased, as TRL computes it) plus `eps` when `scale`. A group whose samples all scored the same
    gets advantage 0: it carries no signal about which answer is better."""
    g = _groups(scores, group_size)
    adv = g - g.mean(1, keepdim=True)
    if scale:
        std = g.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(adv[:, :1])
        adv = adv / (std + eps)
    return adv.reshape(-1)


def rloo(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): each sample's score minus the mean of the other
    G-1 samples of its prompt, A_i = r_i - (Σ_j r_j - r_i) / (G - 1). Needs G >= 2."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    g = _groups(scores, group_size)
    return (g - (g.sum(1, keepdim=True) - g) / (group_size - 1)).reshape(-1)


def reinforce_baseline(scores: torch.Tensor) -> torch.Tensor:
    """REINFORCE with a baseline: each score minus the mean score of the whole rollout batch."""
    return scores - scores.mean()


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(f"scores must be (prompts x {group_size},), got shape {tuple(scores.shape)}")
    return scores.float().view(-1, group_size)


def token_rewards(scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None,
                  kl_coef: float = 0.0) -> torch.Tensor:
    """PPO-RLHF's per-token rewards (Ziegler et al. 2019): -kl_coef x KL_t at every response token, plus
    the sequence's score at its last real token. scores (N,), mask (N, T), kl (N, T) or None."""
    m = mask.to(torch.float32)
    rewards = torch.zeros_like(m) if kl is None else -kl_coef * kl.float() * m
    last = (m.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores.float() * (m.sum(1) > 0)
    return rewards


class KLController:
    """The KL coefficient β: fixed, or adaptive (Ziegler et al. 2019), which moves β so the observed KL
    tracks `target`:  e = clip(KL / target - 1, -0.2, 0.2);  β <- β (1 + e n / horizon), n = samples seen."""

    def __init__(self, coef: float, target: float | None = None, horizon: int = 10000):
        if target is not None and target <= 0:
            raise ValueError("an adaptive KL target must be > 0")
        self.coef, self.target, self.horizon = float(coef), target, horizon

    def update(self, kl: float, n_samples: int) -> float:
        if self.target is not None and math.isfinite(kl):
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.coef *= 1 + error * n_samples / self.horizon
        return self.coef

    def state_dict(self) -> dict[str, float]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef = float(state["coef"])
