"""Preference losses: reward-model (Bradley-Terry), reference-based pairwise (DPO, IPO, hinge),
reference-free pairwise (SimPO, ORPO) and unpaired (KTO).

Convention: every loss returns the per-example losses, shape (B,), and reduces nothing. The caller
takes `.mean()` (or weights, masks, or sums over a gradient-accumulation window), and builds its
diagnostics from `implicit_rewards`. Inputs are sequence log-probabilities from
`tunesmith.losses.logprobs.sequence_logprobs`, in float32:

- `PAIRWISE_LOSSES` (DPO "sigmoid", "ipo", "hinge") take `(pc, pr, rc, rr, beta)`: summed log-probs of
  the policy (p) and the frozen reference (r) on the chosen (c) and rejected (r) completions.
  Only "sigmoid" takes an extra keyword, `label_smoothing` (cDPO).
- `simpo(pc_mean, pr_mean, beta, gamma)` and `orpo(pc_mean, pr_mean, nll_chosen, lam)` need no
  reference model and take length-normalised log-probs (sum_logps / n_tokens); ORPO also takes the
  chosen completion's NLL.
- `kto(policy_logps, ref_logps, desirable, kl_ref, beta, ...)` is unpaired: one completion per example,
  labelled desirable or not.
- `bradley_terry(r_chosen, r_rejected, ...)` takes a reward model's scalar scores, not log-probs.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

_LN2 = 0.6931471805599453


def implicit_rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward r(x, y) = β (log π(y|x) - log π_ref(y|x)) (Rafailov et al. 2023, Eq. 5).

    policy_logps, ref_logps: (B,) summed sequence log-probs. Returns (B,). The β log Z(x) term of the
    true reward cancels between two completions of one prompt, so reward accuracy
    mean(r_chosen > r_rejected) and margin mean(r_chosen - r_rejected) are meaningful; detach for logging.
    """
    return beta * (policy_logps - ref_logps)


def bradley_terry(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Reward-model loss: -log σ(r_c - r_r - m) + η (r_c + r_r)^2, per pair.

    The Bradley-Terry (1952) pairwise likelihood as used to train reward models in InstructGPT
    (Ouyang et al. 2022); the margin m (B,) is Llama 2's (Touvron et al. 2023) "how much better" rating;
    η = center_coef is the centering term of Eisenstein et al. 2023 ("Helping or Herding? Reward Model
    Ensembles Mitigate but do not Eliminate Reward Hacking"), which pins the free additive constant of
    the reward near 0 (TRL's `center_rewards_coefficient`).
    r_chosen, r_rejected: (B,) scalar rewards. Returns (B,).
    """
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff) + center_coef * (r_chosen + r_rejected) ** 2


def dpo_sigmoid(
    pc: torch.Tensor,
    pr: torch.Tensor,
    rc: torch.Tensor,
    rr: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """DPO: -(1-ε) log σ(β h) - ε log σ(-β h),  h = (pc - rc) - (pr - rr), per pair.

    Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7 at ε = 0. ε > 0 is conservative DPO
    (cDPO, Mitchell 2023, "A note on DPO with noisy preferences"): the expected loss when each label is
    flipped with probability ε, which bounds the optimal margin instead of pushing it to infinity.
    pc, pr, rc, rr: (B,) summed sequence log-probs (see module docstring); β the KL strength.
    Returns (B,). At h = 0 the loss is ln 2 for any ε, with d/d pc = -β/2 + εβ.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    logits = beta * ((pc - rc) - (pr - rr))
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def ipo(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO: (h - 1/(2β))^2,  h = (pc - rc) - (pr - rr), per pair.

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    Eq. 17 with τ = β: regresses the log-ratio margin onto 1/(2β) rather than to infinity.
    pc, pr, rc, rr: (B,) sequence log-probs. Returns (B,).
    Which log-probs to pass is the caller's decision: the paper writes sequence sums, while TRL's
    DPOTrainer (loss_type="ipo") passes each log-ratio divided by its completion's token count, i.e.
    pc/n_c, rc/n_c, pr/n_r, rr/n_r (the form TRL says the IPO authors confirmed). With sums the squared
    term grows with length, so β tuned for one form is wrong for the other.
    """
    return ((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2


def hinge(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float) -> torch.Tensor:
    """Hinge: relu(1 - β h),  h = (pc - rc) - (pr - rr), per pair.

    SLiC's calibration loss max(0, δ - log π(y_c|x) + log π(y_r|x)) (Zhao et al. 2023, "SLiC-HF") in the
    reference-normalised form of RSO (Liu et al. 2023, "Statistical Rejection Sampling Improves
    Preference Optimization"): relu(1 - β h) = β relu(1/β - h), a margin δ = 1/β on the log-ratio h.
    pc, pr, rc, rr: (B,) summed sequence log-probs. Returns (B,); zero gradient once h ≥ 1/β.
    """
    return torch.relu(1 - beta * ((pc - rc) - (pr - rr)))


def simpo(pc_mean: torch.Tensor, pr_mean: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimPO: -log σ(β (pc_mean - pr_mean) - γ), per pair.

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", Eq. 6.
    pc_mean, pr_mean: (B,) length-normalised policy log-probs (sum_logps / n_tokens); no reference model.
    γ is the absolute target margin, as in the paper and TRL's CPOConfig.simpo_gamma; the SimPO
    repository's `gamma_beta_ratio` is γ/β, so pass gamma = gamma_beta_ratio * beta. Returns (B,).
    """
    return -F.logsigmoid(beta * (pc_mean - pr_mean) - gamma)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2 (Mächler 2012, "Accurately Computing
    log(1 - exp(-|a|))"): expm1 near 0, where 1 - exp(x) cancels; log1p far below, where exp(x) is tiny."""
    return torch.where(x > -_LN2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo(pc_mean: torch.Tensor, pr_mean: torch.Tensor, nll_chosen: torch.Tensor, lam: float) -> torch.Tensor:
    """ORPO: nll_chosen + λ (-log σ(log OR)), per pair, where

        log OR = (ℓ_c - log(1 - e^ℓ_c)) - (ℓ_r - log(1 - e^ℓ_r)),  ℓ = mean token log-prob (log-odds of
        the length-normalised likelihood P = e^ℓ).

    Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", Eqs. 6-7.
    pc_mean, pr_mean: (B,) length-normalised policy log-probs, strictly < 0 (ℓ = 0 has infinite odds).
    nll_chosen: (B,) or scalar SFT loss on the chosen completion (TRL uses one token mean over the whole
    chosen batch). λ = lam is TRL's ORPOConfig.beta. Returns (B,) (a scalar nll broadcasts).
    """
    log_odds = (pc_mean - pr_mean) - (_log1mexp(pc_mean) - _log1mexp(pr_mean))
    return nll_chosen - lam * F.logsigmoid(log_odds)


def kto(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_ref: torch.Tensor | float,
    beta: float,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
) -> torch.Tensor:
    """KTO, per example, with r = policy_logps - ref_logps and z0 = max(kl_ref, 0) detached:

        desirable:    λ_D (1 - σ(β (r - z0)))
        undesirable:  λ_U (1 - σ(β (z0 - r)))

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", Eq. 7.
    policy_logps, ref_logps: (B,) summed sequence log-probs of one completion each; desirable: (B,) bool;
    kl_ref: scalar estimate of KL(π || π_ref), in practice mean(policy - ref log-probs) on mismatched
    prompt/completion pairs of the batch. It is a reference point, not a path for gradients, hence
    detached. The paper advises λ_D n_D / (λ_U n_U) in [1, 4/3]. Returns (B,); its mean is TRL's
    KTOTrainer loss (loss_type="kto").
    """
    z0 = torch.as_tensor(kl_ref, dtype=policy_logps.dtype, device=policy_logps.device).detach().clamp(min=0)
    logratio = policy_logps - ref_logps
    chosen = lambda_d * (1 - torch.sigmoid(beta * (logratio - z0)))
    rejected = lambda_u * (1 - torch.sigmoid(beta * (z0 - logratio)))
    return torch.where(desirable, chosen, rejected)


# Reference-based pairwise losses sharing the signature (pc, pr, rc, rr, beta) -> (B,); only "sigmoid"
# accepts a keyword (label_smoothing, which makes it cDPO). Names follow TRL's DPOConfig.loss_type.
PAIRWISE_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "sigmoid": dpo_sigmoid,
    "ipo": ipo,
    "hinge": hinge,
}
