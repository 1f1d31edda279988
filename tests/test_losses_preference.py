"""Preference losses and sequence log-probs: hand-derived values, and TRL 1.16's own loss code as oracle.

No TRL trainer is constructed. Each oracle calls the (unbound) trainer method that holds the loss, with a
SimpleNamespace standing in for `self`. Where that method runs the model itself (DPO, KTO, reward), the
model is a fake whose per-token log-probs come from a lookup table, so TRL's sequence log-probs are
exactly the numbers we pass to our functions.
"""
from __future__ import annotations

import math
from collections import defaultdict
from types import MethodType, SimpleNamespace

import pytest
import torch
from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.experimental.orpo.orpo_trainer import ORPOTrainer
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.kto_trainer import KTOTrainer
from trl.trainer.reward_trainer import RewardTrainer

from tunesmith.losses import (
    PAIRWISE_LOSSES,
    bradley_terry,
    dpo_sigmoid,
    hinge,
    implicit_rewards,
    ipo,
    kto,
    orpo,
    sequence_logprobs,
    simpo,
    token_cross_entropy,
)

LN2, LN3 = math.log(2), math.log(3)
B = 6


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-6) -> bool:
    return a.shape == b.shape and torch.allclose(a, b.to(a.dtype), atol=atol)


def rand_logps(n: int, seed: int, dtype=torch.float64, scale: float = 40.0) -> list[torch.Tensor]:
    """n tensors of B sequence log-probs, uniform in (-scale, 0)."""
    g = torch.Generator().manual_seed(seed)
    return [-scale * torch.rand(B, generator=g, dtype=dtype) for _ in range(n)]


# ---------------------------------------------------------------- TRL harness


def trainer_self(**attrs) -> SimpleNamespace:
    """The attributes TRL's loss methods read from `self`, besides the loss's own hyper-parameters."""
    ident = lambda t: t  # noqa: E731 - single process: gathers are identities
    return SimpleNamespace(
        model=SimpleNamespace(training=False),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=ident, gather_for_metrics=ident),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        aux_loss_enabled=False,
        **attrs,
    )


def table_batch(values: torch.Tensor, lengths: torch.Tensor) -> tuple:
    """A fake LM and the rows to feed it: row k is [0, k+1, 0, ...] with a completion of lengths[k] tokens,
    and the LM gives it per-token log-probs [values[k], 0, 0, ...], so TRL's sum over tokens is values[k]."""
    table = torch.cat([values.new_zeros(1), values])
    width = int(lengths.max()) + 1
    input_ids = torch.zeros(len(values), width, dtype=torch.long)
    input_ids[:, 1] = torch.arange(1, len(values) + 1)
    pos = torch.arange(width)
    completion_mask = ((pos >= 1) & (pos <= lengths[:, None])).long()

    def lm(input_ids, **_):
        logps = table[input_ids[:, 1:]]
        zeros = torch.zeros_like(logps)
        return SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    return lm, input_ids, completion_mask


def trl_dpo(pc, pr, rc, rr, n_c, n_r, loss_type, beta) -> torch.Tensor:
    """TRL's DPOTrainer._compute_loss (its mean over the batch); n_c, n_r are completion lengths."""
    lm, input_ids, completion_mask = table_batch(torch.cat([pc, pr]), torch.cat([n_c, n_r]))
    self = trainer_self(
        beta=beta, loss_types=[loss_type], loss_weights=[1.0], label_smoothing=0.0, ld_alpha=None,
        f_divergence_type="reverse_kl", precompute_ref_logps=True, use_weighting=False,
    )
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                  completion_mask=completion_mask, ref_chosen_logps=rc, ref_rejected_logps=rr)
    return DPOTrainer._compute_loss(self, lm, inputs, return_outputs=False)


def trl_kto(policy, ref, desirable, kl_policy, kl_ref, beta, lambda_d, lambda_u) -> torch.Tensor:
    """TRL's KTOTrainer._compute_loss (its mean over the batch); KL rows come after the policy rows."""
    n = len(policy)
    lm, input_ids, completion_mask = table_batch(torch.cat([policy, kl_policy]), torch.ones(n + len(kl_policy)))
    self = trainer_self(beta=beta, loss_type="kto", calculate_KL=True, precompute_ref_logps=True,
                        desirable_weight=lambda_d, undesirable_weight=lambda_u)
    self._compute_kl_logps = MethodType(KTOTrainer._compute_kl_logps, self)
    ones = torch.ones_like(input_ids)
    inputs = dict(input_ids=input_ids[:n], attention_mask=ones[:n], completion_mask=completion_mask[:n],
                  label=desirable, ref_logps=ref, ref_KL_logps=kl_ref, KL_input_ids=input_ids[n:],
                  KL_attention_mask=ones[n:], KL_completion_mask=completion_mask[n:])
    return KTOTrainer._compute_loss(self, lm, inputs, return_outputs=False)


def trl_reward(r_chosen, r_rejected, margin, center_coef) -> torch.Tensor:
    """TRL's RewardTrainer.compute_loss (its mean over the batch); the model's logits are the rewards."""
    logits = torch.cat([r_chosen, r_rejected]).unsqueeze(-1)
    self = trainer_self(args=SimpleNamespace(center_rewards_coefficient=center_coef))
    inputs = dict(input_ids=torch.zeros(len(logits), 1, dtype=torch.long), attention_mask=torch.ones(len(logits), 1))
    if margin is not None:
        inputs["margin"] = margin
    return RewardTrainer.compute_loss(self, lambda **_: SimpleNamespace(logits=logits), inputs)


# ---------------------------------------------------------------- sequence_logprobs


def test_sequence_logprobs_hand_values():
    # Zero logits over V = 4: every token has log p = -ln 4. Row 0 has 2 targets, row 1 none.
    logits = torch.zeros(2, 3, 4, requires_grad=True)
    targets = torch.tensor([[1, -100, 2], [-100, -100, -100]])
    sums, n = sequence_logprobs(logits, targets)
    assert close(sums, torch.tensor([-2 * math.log(4), 0.0])) and n.tolist() == [2, 0]
    # d/d logits of log softmax(z)[y] is onehot(y) - softmax(z) = onehot(y) - 1/4, zero at ignored positions.
    sums.sum().backward()
    assert close(logits.grad[0, 0], torch.tensor([-0.25, 0.75, -0.25, -0.25]))
    assert logits.grad[0, 1].abs().max() == 0 and logits.grad[1].abs().max() == 0


def test_sequence_logprobs_matches_naive_loop_cross_entropy_and_trl():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(3, 7, 11, generator=g)
    targets = torch.randint(0, 11, (3, 7), generator=g)
    targets[0, :2] = -100  # a prompt prefix
    targets[1, 5:] = -100  # padding
    sums, n = sequence_logprobs(logits, targets)
    assert sums.dtype == torch.float32 and sums.shape == (3,) and n.shape == (3,)

    naive = torch.zeros(3, dtype=torch.float64)
    for b in range(3):
        for t in range(7):
            if targets[b, t] != -100:
                row = logits[b, t].double()
                naive[b] += row[targets[b, t]] - math.log(sum(math.exp(v) for v in row.tolist()))
    assert close(sums, naive, atol=1e-5)
    assert n.tolist() == (targets != -100).sum(-1).tolist()

    for b in range(3):  # the same row through the SFT loss: sum log p = -(sum of cross-entropy)
        ce_sum, ce_n = token_cross_entropy(logits[b : b + 1], targets[b : b + 1])
        assert close(sums[b], -ce_sum, atol=1e-5) and n[b] == ce_n

    # TRL's get_batch_logps shifts labels itself (labels[:, 1:] against logits[:, :-1]), so pad one step.
    trl_logits = torch.cat([logits, torch.zeros(3, 1, 11)], dim=1)
    trl_labels = torch.cat([torch.full((3, 1), -100), targets], dim=1)
    assert close(sums, ORPOTrainer.get_batch_logps(trl_logits, trl_labels), atol=1e-5)


def test_sequence_logprobs_bf16_and_extreme_logits_are_finite():
    g = torch.Generator().manual_seed(1)
    logits = (1e4 * torch.randn(2, 5, 32, generator=g)).bfloat16().requires_grad_()
    targets = torch.randint(0, 32, (2, 5), generator=g)
    sums, _ = sequence_logprobs(logits, targets)
    assert sums.dtype == torch.float32 and torch.isfinite(sums).all()
    sums.sum().backward()
    assert torch.isfinite(logits.grad.float()).all()


# ---------------------------------------------------------------- hand-derived values


def test_implicit_rewards():
    # 0.1 * (-1 - -2) = 0.1;  0.1 * (-5 - -5) = 0
    assert close(implicit_rewards(torch.tensor([-1.0, -5.0]), torch.tensor([-2.0, -5.0]), 0.1), torch.tensor([0.1, 0.0]))


def test_bradley_terry_hand_values():
    # -log σ(ln 3) = ln(4/3);  -log σ(2 - 0 - 2) = ln 2
    assert close(bradley_terry(torch.tensor([LN3, 2.0]), torch.tensor([0.0, 0.0]), torch.tensor([0.0, 2.0])),
                 torch.tensor([math.log(4 / 3), LN2]))
    # centering: (1, 1) -> -log σ(0) + 0.01 * (1 + 1)^2 = ln 2 + 0.04;  (1, -1) -> -log σ(2) + 0 = ln(1 + e^-2)
    assert close(bradley_terry(torch.tensor([1.0, 1.0]), torch.tensor([1.0, -1.0]), center_coef=0.01),
                 torch.tensor([LN2 + 0.04, math.log1p(math.exp(-2))]))


def test_dpo_equal_policy_and_reference_is_ln2_with_gradient_minus_beta_over_2():
    # h = 0 -> -log σ(0) = ln 2; d/dh [-log σ(β h)] = -β (1 - σ(β h)) = -β/2, and dh/d pc = 1, dh/d pr = -1.
    beta = 0.1
    pc, pr = torch.tensor([-3.0, -10.0, -0.5], requires_grad=True), torch.tensor([-7.0, -2.0, -40.0], requires_grad=True)
    loss = dpo_sigmoid(pc, pr, pc.detach(), pr.detach(), beta)
    assert close(loss, torch.full((3,), LN2))
    loss.sum().backward()
    assert close(pc.grad, torch.full((3,), -beta / 2)) and close(pr.grad, torch.full((3,), beta / 2))


def test_cdpo_hand_values():
    # β h = ln 3: σ(ln 3) = 3/4, σ(-ln 3) = 1/4, so with ε = 0.1 the loss is 0.9 ln(4/3) + 0.1 ln 4.
    zero = torch.zeros(1)
    loss = dpo_sigmoid(torch.tensor([LN3]), zero, zero, zero, beta=1.0, label_smoothing=0.1)
    assert close(loss, torch.tensor([0.9 * math.log(4 / 3) + 0.1 * math.log(4)]))
    # At h = 0 the loss is ln 2 whatever ε.
    assert close(dpo_sigmoid(zero, zero, zero, zero, beta=1.0, label_smoothing=0.3), torch.tensor([LN2]))
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_sigmoid(zero, zero, zero, zero, beta=1.0, label_smoothing=0.5)


def test_ipo_hand_values_and_gradient():
    # β = 0.5 -> target 1/(2β) = 1; h = 0, 1, 3 -> (h - 1)^2 = 1, 0, 4; d/d pc = 2 (h - 1) = -2, 0, 4.
    pc = torch.tensor([0.0, 1.0, 3.0], requires_grad=True)
    zero = torch.zeros(3)
    loss = ipo(pc, zero, zero, zero, beta=0.5)
    assert close(loss, torch.tensor([1.0, 0.0, 4.0]))
    loss.sum().backward()
    assert close(pc.grad, torch.tensor([-2.0, 0.0, 4.0]))


def test_hinge_hand_values_and_gradient():
    # β = 0.5: h = -2, 0, 1, 4 -> relu(1 - h/2) = 2, 1, 0.5, 0; d/d pc = -β inside the margin, 0 past it.
    pc = torch.tensor([-2.0, 0.0, 1.0, 4.0], requires_grad=True)
    zero = torch.zeros(4)
    loss = hinge(pc, zero, zero, zero, beta=0.5)
    assert close(loss, torch.tensor([2.0, 1.0, 0.5, 0.0]))
    loss.sum().backward()
    assert close(pc.grad, torch.tensor([-0.5, -0.5, -0.5, 0.0]))


def test_simpo_hand_values():
    # β = 2, γ = 1: 2 (-1 - -1.5) - 1 = 0 -> ln 2;  2 (-1 - -2) - 1 = 1 -> -log σ(1) = ln(1 + e^-1)
    loss = simpo(torch.tensor([-1.0, -1.0]), torch.tensor([-1.5, -2.0]), beta=2.0, gamma=1.0)
    assert close(loss, torch.tensor([LN2, math.log1p(math.exp(-1))]))


def test_orpo_hand_values():
    # P_c = 1/2 -> odds 1, log-odds 0;  P_r = 1/4 -> odds (1/4)/(3/4) = 1/3, log-odds -ln 3.
    # log OR = ln 3 -> -log σ(ln 3) = ln(4/3): loss = 2 + 0.1 ln(4/3). Equal likelihoods: log OR = 0 -> 2 + 0.1 ln 2.
    loss = orpo(torch.log(torch.tensor([0.5, 0.5])), torch.log(torch.tensor([0.25, 0.5])), torch.tensor(2.0), lam=0.1)
    assert close(loss, torch.tensor([2 + 0.1 * math.log(4 / 3), 2 + 0.1 * LN2]))


def test_orpo_log_odds_accurate_near_certainty_in_float32():
    # ℓ_r = -1e-10: 1 - e^ℓ_r rounds to 0 in float32 (naive log1p(-exp) gives -inf), but equals 1e-10 to
    # first order, so log-odds_r = ℓ_r - ln(1e-10) ≈ 23.02585. With ℓ_c = ln(1/2) (log-odds 0):
    # log OR = -23.02585 and the loss is λ softplus(23.02585) = λ (23.02585 + log1p(e^-23.03)).
    x = -1e-10 - math.log(1e-10)
    loss = orpo(torch.tensor([math.log(0.5)]), torch.tensor([-1e-10]), torch.tensor(0.0), lam=0.1)
    assert torch.isfinite(loss).all() and abs(loss.item() - 0.1 * (x + math.log1p(math.exp(-x)))) < 1e-5


def test_kto_hand_values_clamp_and_detached_reference_point():
    # β = 1, z0 = 0.5.  desirable r = 0.5: λ_D (1 - σ(0)) = 1 * 0.5.
    # undesirable r = 0.5 - ln 3: λ_U (1 - σ(z0 - r)) = 1.5 * (1 - σ(ln 3)) = 1.5 / 4 = 0.375.
    policy = torch.tensor([0.5, 0.5 - LN3], requires_grad=True)
    kl_ref = torch.tensor(0.5, requires_grad=True)
    loss = kto(policy, torch.zeros(2), torch.tensor([True, False]), kl_ref, beta=1.0, lambda_u=1.5)
    assert close(loss, torch.tensor([0.5, 0.375]))
    # d/dr λ_D (1 - σ(r - z0)) = -σ'(0) = -1/4;  d/dr λ_U (1 - σ(z0 - r)) = 1.5 σ(ln 3) σ(-ln 3) = 1.5 * 3/16
    loss.sum().backward()
    assert close(policy.grad, torch.tensor([-0.25, 1.5 * 3 / 16])) and kl_ref.grad is None
    # A negative KL estimate is clamped to 0: desirable r = 0 -> 1 - σ(0) = 0.5.
    assert close(kto(torch.zeros(1), torch.zeros(1), torch.tensor([True]), -2.0, beta=1.0), torch.tensor([0.5]))


# ---------------------------------------------------------------- TRL oracles on random inputs


@pytest.mark.parametrize("name", sorted(PAIRWISE_LOSSES))
def test_pairwise_losses_match_trl_dpo_trainer(name):
    pc, pr, rc, rr = rand_logps(4, seed=0)
    g = torch.Generator().manual_seed(1)
    n_c, n_r = torch.randint(1, 9, (B,), generator=g), torch.randint(1, 9, (B,), generator=g)
    beta = 0.3
    if name == "ipo":  # TRL's IPO divides each log-ratio by its completion length; ours takes what it is given.
        ours = ipo(pc / n_c, pr / n_r, rc / n_c, rr / n_r, beta)
    else:
        ours = PAIRWISE_LOSSES[name](pc, pr, rc, rr, beta)
    # TRL's trainers return the batch mean: one example at a time gives the per-example losses.
    rows = (pc, pr, rc, rr, n_c, n_r)
    theirs = torch.stack([trl_dpo(*(t[i : i + 1] for t in rows), name, beta) for i in range(B)])
    assert ours.shape == (B,) and close(ours, theirs)
    assert close(ours.mean(), trl_dpo(*rows, name, beta))


def test_cdpo_matches_trl_cpo_sigmoid_and_a_naive_loop():
    # TRL 1.16's DPOTrainer "sigmoid" ignores label_smoothing; its CPOTrainer "sigmoid" (reference-free,
    # logits = β (pc - pr)) applies it, so feeding it the log-ratios pc - rc, pr - rr gives cDPO.
    pc, pr, rc, rr = rand_logps(4, seed=2)
    beta, eps = 0.2, 0.15
    ours = dpo_sigmoid(pc, pr, rc, rr, beta, label_smoothing=eps)
    cpo_self = trainer_self(alpha=0.0, loss_type="sigmoid", beta=beta, label_smoothing=eps)
    assert close(ours, CPOTrainer.cpo_loss(cpo_self, pc - rc, pr - rr)[0])
    log_sigmoid = lambda x: -math.log1p(math.exp(-x))  # noqa: E731 - |x| stays small here
    naive = [-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
             for h in ((pc - rc) - (pr - rr)).tolist()]
    assert close(ours, torch.tensor(naive, dtype=torch.float64))


def test_simpo_matches_trl_cpo_trainer():
    # CPOTrainer's simpo_gamma is the absolute margin γ (it subtracts γ/β, then multiplies by β).
    pc, pr = rand_logps(2, seed=3, scale=4.0)
    beta, gamma = 2.5, 1.4
    cpo_self = trainer_self(alpha=0.0, loss_type="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=0.0)
    assert close(simpo(pc, pr, beta, gamma), CPOTrainer.cpo_loss(cpo_self, pc, pr)[0])


def test_orpo_matches_trl_odds_ratio_loss():
    # TRL returns λ log σ(log OR) per example and its loss is nll - mean of that; it computes in float32.
    pc, pr = rand_logps(2, seed=4, dtype=torch.float32, scale=3.0)
    pc[0], pr[1] = -1e-7, -1e-9  # near-certain completions exercise the expm1 branch of log(1 - e^x)
    nll, lam = torch.rand(B, generator=torch.Generator().manual_seed(5)), 0.1
    trl_terms = ORPOTrainer.odds_ratio_loss(trainer_self(beta=lam), pc, pr)[0]
    assert close(orpo(pc, pr, nll, lam), nll - trl_terms)
    assert close(orpo(pc, pr, nll.mean(), lam).mean(), nll.mean() - trl_terms.mean())


def test_kto_matches_trl_kto_trainer():
    policy, ref, kl_policy, kl_ref = rand_logps(4, seed=6, scale=10.0)
    desirable = torch.tensor([True, False, True, True, False, False])
    beta, lambda_d, lambda_u = 0.4, 1.0, 1.33
    for offset in (3.0, -6.0):  # KL estimate ≈ +2.3, then ≈ -6.7, which TRL clamps to 0
        z = (kl_policy + offset - kl_ref).mean()
        ours = kto(policy, ref, desirable, z, beta, lambda_d, lambda_u)
        args = (kl_policy + offset, kl_ref, beta, lambda_d, lambda_u)
        theirs = torch.stack([trl_kto(policy[i : i + 1], ref[i : i + 1], desirable[i : i + 1], *args) for i in range(B)])
        assert close(ours, theirs)
        assert close(ours.mean(), trl_kto(policy, ref, desirable, *args))


@pytest.mark.parametrize("with_margin", [False, True])
def test_bradley_terry_matches_trl_reward_trainer(with_margin):
    g = torch.Generator().manual_seed(7)
    r_c, r_r, m = (3 * torch.randn(B, generator=g, dtype=torch.float64) for _ in range(3))
    margin = m.abs() if with_margin else None
    ours = bradley_terry(r_c, r_r, margin, center_coef=0.01)
    theirs = torch.stack([
        trl_reward(r_c[i : i + 1], r_r[i : i + 1], None if margin is None else margin[i : i + 1], 0.01)
        for i in range(B)
    ])
    assert close(ours, theirs) and close(ours.mean(), trl_reward(r_c, r_r, margin, 0.01))


# ---------------------------------------------------------------- gradients and extreme inputs

# Every loss on the same four (B,) log-prob tensors; SimPO and ORPO get them scaled to per-token means.
LOSS_CASES = {
    **{name: (lambda fn: lambda pc, pr, rc, rr: fn(pc, pr, rc, rr, 0.1))(fn) for name, fn in PAIRWISE_LOSSES.items()},
    "cdpo": lambda pc, pr, rc, rr: dpo_sigmoid(pc, pr, rc, rr, 0.1, label_smoothing=0.1),
    "bradley_terry": lambda pc, pr, rc, rr: bradley_terry(pc, pr, margin=rc.detach().abs(), center_coef=0.01),
    "simpo": lambda pc, pr, rc, rr: simpo(pc / 10, pr / 10, 2.0, 1.0),
    "orpo": lambda pc, pr, rc, rr: orpo(pc / 10, pr / 10, -pc / 10, 0.1),
    "kto": lambda pc, pr, rc, rr: kto(pc, rc, torch.arange(B) % 2 == 0, (pr - rr).mean(), 0.1),
}


@pytest.mark.parametrize("scale", [10.0, 1e4])
@pytest.mark.parametrize("name", sorted(LOSS_CASES))
def test_losses_and_gradients_are_finite(name, scale):
    # scale 1e4: sequence log-probs like -1e4 (long, unlikely completions) must not overflow or give NaN.
    leaves = [t.requires_grad_() for t in rand_logps(4, seed=8, dtype=torch.float32, scale=scale)]
    loss = LOSS_CASES[name](*leaves)
    assert loss.shape == (B,) and torch.isfinite(loss).all()
    loss.mean().backward()
    grads = [t.grad for t in leaves if t.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
    if scale == 10.0:  # at 1e4 saturated sigmoids and an inactive hinge rightly give zero gradients
        assert any(gr.abs().sum() > 0 for gr in grads)


def test_flat_and_chunked_sequence_logprobs_equal_the_padded_ones_values_and_gradients():
    """Sequences laid end to end (flat) and log-probs taken from hidden states chunk by chunk (no full
    logits) give the padded path's sums and counts, and the same gradients for any per-sequence weights."""
    from tunesmith.losses.cross_entropy import IGNORE
    from tunesmith.losses.logprobs import flat_sequence_logprobs, linear_sequence_logprobs

    gen = torch.Generator().manual_seed(0)
    lengths, d, vocab = [5, 3, 7, 1], 8, 11
    hidden = torch.randn(sum(lengths), d, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, d, generator=gen, requires_grad=True)
    targets = torch.randint(0, vocab, (sum(lengths),), generator=gen)
    targets[[0, 5, 6, 8]] = IGNORE  # prompt tokens
    sequence = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    upstream = torch.tensor([0.5, -2.0, 1.0, 3.0])  # what a preference loss weighs each sequence by

    # padded reference: one row per sequence
    width = max(lengths)
    rows_h = torch.zeros(len(lengths), width, d)
    rows_t = torch.full((len(lengths), width), IGNORE)
    start = 0
    for i, n in enumerate(lengths):
        rows_h[i, :n], rows_t[i, :n] = hidden[start:start + n], targets[start:start + n]
        start += n
    want, want_n = sequence_logprobs(rows_h @ weight.T, rows_t)
    (want * upstream).sum().backward()
    want_grads = hidden.grad.clone(), weight.grad.clone()

    for name, fn in [("flat", lambda: flat_sequence_logprobs(hidden @ weight.T, targets, sequence, 4)),
                     ("chunked", lambda: linear_sequence_logprobs(hidden, weight, targets, sequence, 4,
                                                                  rows_per_chunk=2))]:
        hidden.grad = weight.grad = None
        got, got_n = fn()
        torch.testing.assert_close(got, want, msg=name)
        assert torch.equal(got_n, want_n), name
        (got * upstream).sum().backward()
        torch.testing.assert_close(hidden.grad, want_grads[0], msg=name)
        torch.testing.assert_close(weight.grad, want_grads[1], msg=name)
