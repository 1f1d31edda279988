"""Online-RL objectives (`tunesmith.losses.rl`) and advantage estimators (`tunesmith.rl.advantages`).

Every expected value is derived by hand and written out as a literal, with the arithmetic in a comment;
only the property checks (non-negativity, Monte-Carlo KL, micro-batch splitting) use random numbers.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from tunesmith.losses.rl import (
    aggregate,
    clipped_surrogate,
    clipped_value_loss,
    entropy_from_logits,
    kl_estimate,
    masked_mean,
    token_logprobs,
)
from tunesmith.rl.advantages import (
    KLController,
    gae,
    group_advantages,
    reinforce_baseline,
    rloo,
    token_rewards,
    whiten,
)

LN2 = math.log(2)


def t(values) -> torch.Tensor:
    """A float32 tensor from a (nested) list literal."""
    return torch.tensor(values, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------- GAE


def test_gae_gamma1_lam1_is_reward_to_go_minus_value():
    rewards = t([[0.0, 0.0, 1.0]])
    values = t([[0.5, 0.2, 0.4]])
    mask = t([[1.0, 1.0, 1.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # reward-to-go is 1 at every step: A = 1 - V = [0.5, 0.8, 0.6]; returns = A + V = [1, 1, 1]
    assert_close(adv, t([[0.5, 0.8, 0.6]]))
    assert_close(ret, t([[1.0, 1.0, 1.0]]))


def test_gae_gamma09_lam05_by_hand():
    rewards = t([[1.0, 0.0, 2.0]])
    values = t([[0.5, 1.0, 0.2]])
    mask = t([[1.0, 1.0, 1.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # gamma * lam = 0.45; V after the last token is 0
    # d2 = 2 + 0.9*0   - 0.2 =  1.8       A2 = 1.8
    # d1 = 0 + 0.9*0.2 - 1.0 = -0.82      A1 = -0.82 + 0.45*1.8    = -0.01
    # d0 = 1 + 0.9*1.0 - 0.5 =  1.4       A0 =  1.4  + 0.45*(-0.01) = 1.3955
    # returns = A + V = [1.8955, 0.99, 2.0]
    assert_close(adv, t([[1.3955, -0.01, 1.8]]))
    assert_close(ret, t([[1.8955, 0.99, 2.0]]))


def test_gae_padding_gives_zero_and_does_not_leak():
    rewards = t([[0.0, 0.0, 1.0],
                 [0.0, 1.0, 5.0]])    # 5.0 sits on padding and must be ignored
    values = t([[0.5, 0.2, 0.4],
                [0.5, 0.3, 99.0]])    # 99.0 sits on padding: it must not bootstrap row 2's last real token
    mask = t([[1.0, 1.0, 1.0],
              [1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # row 1: as in the 3-token example, A = [0.5, 0.8, 0.6]
    # row 2: d1 = 1 + 1*0 - 0.3 = 0.7 (bootstrap 0, not 99)   A1 = 0.7
    #        d0 = 0 + 1*0.3 - 0.5 = -0.2                       A0 = -0.2 + 0.7 = 0.5
    #        padded position: A2 = 0, returns 0
    assert_close(adv, t([[0.5, 0.8, 0.6],
                         [0.5, 0.7, 0.0]]))
    assert_close(ret, t([[1.0, 1.0, 1.0],
                         [1.0, 1.0, 0.0]]))
    real = mask.bool()
    assert_close(ret[real], (adv + values)[real])


# ----------------------------------------------------------------------------------- sequence advantages


def test_group_advantages_scaled():
    scores = t([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(scores, group_size=4)
    # group 1: mean 0.5, deviations ±0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.5773503
    #   A = ±0.5 / (0.5773503 + 1e-4)
    # group 2: all equal -> deviations 0 -> A = 0 exactly
    a = 0.5 / (0.5773503 + 1e-4)
    assert_close(adv, t([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]))
    assert torch.equal(adv[4:], torch.zeros(4))


def test_group_advantages_unscaled_is_centred():
    scores = t([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(scores, group_size=4, scale=False)
    # scores minus group means 0.5 and 2.0
    assert_close(adv, t([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]))


def test_group_advantages_wrong_shape_raises():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(7), group_size=4)


def test_rloo_by_hand():
    adv = rloo(t([1.0, 2.0, 3.0]), group_size=3)
    # baselines are the mean of the other two: (2+3)/2 = 2.5, (1+3)/2 = 2, (1+2)/2 = 1.5
    assert_close(adv, t([1 - 2.5, 2 - 2.0, 3 - 1.5]))


def test_rloo_group_size_one_raises():
    with pytest.raises(ValueError):
        rloo(t([1.0, 2.0]), group_size=1)


def test_rloo_is_scaled_centred_score():
    # r_i - (S - r_i)/(G-1) = (G r_i - S)/(G-1) = G/(G-1) * (r_i - S/G)
    gen = torch.Generator().manual_seed(0)
    G = 5
    scores = torch.randn(4 * G, generator=gen)
    centred = scores.view(-1, G) - scores.view(-1, G).mean(1, keepdim=True)
    assert_close(rloo(scores, G), (G / (G - 1) * centred).reshape(-1))


def test_reinforce_baseline_subtracts_batch_mean():
    # mean of [1, 2, 3, 6] is 3
    assert_close(reinforce_baseline(t([1.0, 2.0, 3.0, 6.0])), t([-2.0, -1.0, 0.0, 3.0]))


# -------------------------------------------------------------------------------------------- whitening


def test_whiten_masked():
    x = t([[1.0, 2.0, 3.0],
           [5.0, 100.0, -7.0]])
    mask = t([[1.0, 1.0, 1.0],
              [1.0, 0.0, 0.0]])
    out = whiten(x, mask)
    m = mask.bool()
    # masked entries 1, 2, 3, 5: mean 2.75, population var = (3.0625+0.5625+0.0625+5.0625)/4 = 2.1875
    std = math.sqrt(2.1875)
    expected = t([[(1 - 2.75) / std, (2 - 2.75) / std, (3 - 2.75) / std],
                  [(5 - 2.75) / std, 0.0, 0.0]])
    assert_close(out, expected)
    assert out[m].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert out[m].std(correction=0).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(out[~m], torch.zeros(2))


def test_whiten_without_mask():
    x = t([1.0, 3.0])
    # mean 2, population std 1 -> [-1, 1]
    assert_close(whiten(x), t([-1.0, 1.0]))


def test_whiten_keep_mean():
    x = t([1.0, 3.0, 5.0, 7.0])
    out = whiten(x, shift_mean=False)
    # mean 4, population var (9+1+1+9)/4 = 5: (x - 4)/sqrt(5) + 4
    s = math.sqrt(5)
    assert_close(out, t([-3 / s + 4, -1 / s + 4, 1 / s + 4, 3 / s + 4]))
    assert out.mean().item() == pytest.approx(4.0, abs=1e-5)
    assert out.std(correction=0).item() == pytest.approx(1.0, abs=1e-5)


# ----------------------------------------------------------------------------------------- KL estimates


def test_kl_estimators_by_hand():
    logp = torch.tensor([math.log(0.5)])
    ref = torch.tensor([math.log(0.25)])
    # log r = ln 0.25 - ln 0.5 = ln 0.5, r = 0.5
    # k1 = -ln 0.5 = ln 2;  k2 = 0.5 * (ln 0.5)^2;  k3 = (0.5 - 1) - ln 0.5 = -0.5 + ln 2
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(LN2, rel=1e-6)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5 * math.log(0.5) ** 2, rel=1e-6)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(-0.5 + LN2, rel=1e-5)
    assert kl_estimate(logp, ref).item() == pytest.approx(-0.5 + LN2, rel=1e-5)    # k3 is the default


def test_kl_k2_k3_nonnegative_and_zero_at_equality():
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(64, 16, generator=gen) * 3
    ref = torch.randn(64, 16, generator=gen) * 3
    assert (kl_estimate(logp, ref, "k2") >= 0).all()
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    for est in ("k1", "k2", "k3"):
        assert torch.equal(kl_estimate(logp, logp, est), torch.zeros_like(logp))


def test_kl_k1_k3_monte_carlo_match_exact_kl():
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    # KL(p||q) = sum p ln(p/q) = 0.1 ln 0.4 + 0.2 ln 0.8 + 0.3 ln 1.2 + 0.4 ln 1.6 ≈ 0.106440
    exact = 0.1 * math.log(0.4) + 0.2 * math.log(0.8) + 0.3 * math.log(1.2) + 0.4 * math.log(1.6)
    assert exact == pytest.approx(0.106440, abs=1e-6)
    gen = torch.Generator().manual_seed(0)
    idx = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    logp, ref = p.log()[idx], q.log()[idx]
    assert kl_estimate(logp, ref, "k1").mean().item() == pytest.approx(exact, abs=0.01)
    assert kl_estimate(logp, ref, "k3").mean().item() == pytest.approx(exact, abs=0.01)


def test_kl_unknown_estimator_raises():
    with pytest.raises(ValueError):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k4")


# ------------------------------------------------------------------------------------ clipped surrogate


def test_clipped_surrogate_four_cases_and_gradient():
    # columns: (ratio 1.5, A +1), (ratio 1.5, A -1), (ratio 0.5, A +1), (ratio 0.5, A -1); eps 0.2
    ratio = t([[1.5, 1.5, 0.5, 0.5]])
    adv = t([[1.0, -1.0, 1.0, -1.0]])
    old = torch.zeros(1, 4)
    logp = ratio.log().requires_grad_(True)
    loss, clipped = clipped_surrogate(logp, old, adv, clip_eps=0.2)
    # max(-1.5, -1.2) = -1.2 clipped;  max(1.5, 1.2) = 1.5;  max(-0.5, -0.8) = -0.5;  max(0.5, 0.8) = 0.8 clipped
    assert_close(loss.detach(), t([[-1.2, 1.5, -0.5, 0.8]]))
    assert clipped.tolist() == [[True, False, False, True]]
    # unclipped: d(-A * exp(logp - old))/dlogp = -A * ratio -> [., 1.5, -0.5, .]; clipped branch is constant -> 0
    loss.sum().backward()
    assert_close(logp.grad, t([[0.0, 1.5, -0.5, 0.0]]))


def test_clipped_surrogate_clip_higher():
    logp = torch.tensor([[math.log(1.25)]])
    old = torch.zeros(1, 1)
    # eps_high 0.28: clamp(1.25, 0.8, 1.28) = 1.25 -> max(-1.25, -1.25) = -1.25, not clipped
    loss, clipped = clipped_surrogate(logp, old, t([[1.0]]), clip_eps=0.2, clip_eps_high=0.28)
    assert loss.item() == pytest.approx(-1.25, rel=1e-6)
    assert not clipped.item()
    # without it the upper bound is 1.2: max(-1.25, -1.2) = -1.2, clipped
    loss, clipped = clipped_surrogate(logp, old, t([[1.0]]), clip_eps=0.2)
    assert loss.item() == pytest.approx(-1.2, rel=1e-6)
    assert clipped.item()


def test_clipped_surrogate_sequence_advantage_broadcasts():
    logp = torch.zeros(2, 3)    # ratio 1 everywhere: loss = -A
    old = torch.zeros(2, 3)
    loss, clipped = clipped_surrogate(logp, old, t([2.0, -3.0]))
    assert_close(loss, t([[-2.0, -2.0, -2.0],
                          [3.0, 3.0, 3.0]]))
    assert not clipped.any()


# ----------------------------------------------------------------------------------------- value loss


def test_clipped_value_loss_clip_active():
    # old V 1, R 2, V 1.5, c 0.2: plain (1.5-2)^2 = 0.25; held V = 1 + 0.2 = 1.2 -> (1.2-2)^2 = 0.64
    # loss = 0.5 * max(0.25, 0.64) = 0.32, clipped
    loss, clipped = clipped_value_loss(t([[1.5]]), t([[1.0]]), t([[2.0]]), clip=0.2)
    assert loss.item() == pytest.approx(0.32, rel=1e-5)
    assert clipped.item()


def test_clipped_value_loss_within_clip():
    # V 1.1 is within 0.2 of old V 1: held V = 1.1 too; (1.1-2)^2 = 0.81 -> 0.405, not clipped
    loss, clipped = clipped_value_loss(t([[1.1]]), t([[1.0]]), t([[2.0]]), clip=0.2)
    assert loss.item() == pytest.approx(0.405, rel=1e-5)
    assert not clipped.item()


def test_clipped_value_loss_no_clip():
    # 0.5 * (V - R)^2: 0.5 * 0.25 = 0.125, 0.5 * 9 = 4.5
    loss, clipped = clipped_value_loss(t([[1.5, 5.0]]), t([[1.0, 1.0]]), t([[2.0, 2.0]]), clip=None)
    assert_close(loss, t([[0.125, 4.5]]))
    assert not clipped.any()


# ------------------------------------------------------------------------------------------ aggregation


def test_aggregate_token_and_sequence():
    per_token = t([[1.0, 2.0, 3.0],
                   [4.0, 0.0, 0.0]])
    mask = t([[1.0, 1.0, 1.0],
              [1.0, 0.0, 0.0]])
    # token: (1+2+3+4) / 4 tokens = 10 / 4 = 2.5
    s, w = aggregate(per_token, mask, "token")
    assert (s.item(), w) == pytest.approx((10.0, 4.0))
    # sequence: row means 6/3 = 2 and 4/1 = 4 over 2 rows: (2 + 4) / 2 = 3.0
    s, w = aggregate(per_token, mask, "sequence")
    assert (s.item(), w) == pytest.approx((6.0, 2.0))
    # constant (Dr. GRPO): 10 / (2 rows x a budget of 8 tokens) = 0.625, the rollout's own width 3 by default
    s, w = aggregate(per_token, mask, "constant", width=8)
    assert (s.item(), w) == pytest.approx((10.0, 16.0))
    assert aggregate(per_token, mask, "constant")[1] == 6.0
    # so a token's weight does not depend on the other answers' lengths, as it does under token
    shorter = mask * t([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert aggregate(per_token, shorter, "constant", width=8)[1] == 16.0 != aggregate(per_token, shorter)[1]
    # a response masked out whole (cut off, under mask_truncated) leaves the weight as it leaves the sum
    cut = t([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    assert aggregate(per_token, cut, "sequence") == (pytest.approx(2.0), 1.0)
    assert aggregate(per_token, cut, "constant", width=8)[1] == 8.0


def test_aggregate_micro_batches_sum_to_whole_batch():
    gen = torch.Generator().manual_seed(0)
    per_token = torch.randn(6, 5, generator=gen)
    lengths = torch.tensor([5, 1, 3, 2, 4, 5])
    mask = (torch.arange(5)[None, :] < lengths[:, None]).float()
    for how in ("token", "sequence", "constant"):
        s, w = aggregate(per_token, mask, how, width=7)
        s1, w1 = aggregate(per_token[:3], mask[:3], how, width=7)
        s2, w2 = aggregate(per_token[3:], mask[3:], how, width=7)
        assert ((s1 + s2) / (w1 + w2)).item() == pytest.approx((s / w).item(), rel=1e-5)


def test_aggregate_unknown_mode_raises():
    with pytest.raises(ValueError):
        aggregate(torch.zeros(1, 1), torch.ones(1, 1), "batch")


def test_masked_mean():
    x = t([[1.0, 2.0, 9.0]])
    assert masked_mean(x, t([[1.0, 1.0, 0.0]])).item() == pytest.approx(1.5)    # (1+2)/2
    assert masked_mean(x, torch.zeros(1, 3)).item() == 0.0


# -------------------------------------------------------------------------------------- token rewards


def test_token_rewards_with_kl():
    scores = t([1.0, 2.0])
    mask = t([[1.0, 1.0, 1.0],
              [1.0, 1.0, 0.0]])
    kl = torch.full((2, 3), 0.5)
    # -0.1 * 0.5 = -0.05 on every real token; score added at the last real token (index 2, index 1)
    # row 1: [-0.05, -0.05, -0.05 + 1] ; row 2: [-0.05, -0.05 + 2, 0 (padding)]
    r = token_rewards(scores, mask, kl, kl_coef=0.1)
    assert_close(r, t([[-0.05, -0.05, 0.95],
                       [-0.05, 1.95, 0.0]]))


def test_token_rewards_without_kl():
    r = token_rewards(t([1.0, 2.0]), t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]))
    assert_close(r, t([[0.0, 0.0, 1.0],
                       [0.0, 2.0, 0.0]]))


# -------------------------------------------------------------------------------------- KL controller


def test_kl_controller_fixed():
    ctl = KLController(0.1)
    for kl in (0.0, 3.0, 100.0):
        assert ctl.update(kl, 256) == 0.1
    assert ctl.coef == 0.1


def test_kl_controller_adaptive():
    ctl = KLController(0.1, target=6.0, horizon=10000)
    # KL 12: e = 12/6 - 1 = 1 -> clipped to 0.2; coef = 0.1 * (1 + 0.2 * 256 / 10000) = 0.100512
    assert ctl.update(12.0, 256) == pytest.approx(0.100512, rel=1e-9)
    ctl = KLController(0.1, target=6.0, horizon=10000)
    # KL 3: e = 3/6 - 1 = -0.5 -> clipped to -0.2; coef = 0.1 * (1 - 0.2 * 256 / 10000) = 0.099488
    assert ctl.update(3.0, 256) == pytest.approx(0.099488, rel=1e-9)


def test_kl_controller_state_dict_round_trip():
    ctl = KLController(0.1, target=6.0)
    ctl.update(12.0, 256)
    other = KLController(0.5, target=6.0)
    other.load_state_dict(ctl.state_dict())
    assert other.coef == ctl.coef
    # both continue identically
    assert other.update(9.0, 64) == ctl.update(9.0, 64)


# --------------------------------------------------------------------------------- log-probs, entropy


def test_uniform_logits_logprob_and_entropy():
    logits = torch.zeros(2, 3, 4)    # V = 4, uniform
    tokens = torch.tensor([[0, 1, 2], [3, 0, 1]])
    # log(1/4) = -ln 4 at every position; entropy ln 4
    assert_close(token_logprobs(logits, tokens), torch.full((2, 3), -math.log(4)))
    assert_close(entropy_from_logits(logits), torch.full((2, 3), math.log(4)))


def test_temperature_logprob_and_entropy():
    logits = t([[[2.0, 0.0]]])
    # T = 2 -> z = [1, 0]; p = [e/(e+1), 1/(e+1)] = [0.7310586, 0.2689414]
    # log p = [-0.3132617, -1.3132617]   (ln(1+e) = 1.3132617)
    # H = ln(1+e) - e/(e+1) = 1.3132617 - 0.7310586 = 0.5822031
    assert token_logprobs(logits, torch.tensor([[0]]), temperature=2.0).item() == pytest.approx(-0.3132617, abs=1e-6)
    assert token_logprobs(logits, torch.tensor([[1]]), temperature=2.0).item() == pytest.approx(-1.3132617, abs=1e-6)
    assert entropy_from_logits(logits, temperature=2.0).item() == pytest.approx(0.5822031, abs=1e-6)
    # T = 1 for contrast: p = softmax([2, 0]) = [0.8807971, 0.1192029], log p0 = -0.1269280
    assert token_logprobs(logits, torch.tensor([[0]])).item() == pytest.approx(-0.1269280, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_token_logprobs_and_entropy_equal_full_logits_values_and_gradients(temperature):
    """`linear_token_logprobs` (the RL passes' chunked head) gives `token_logprobs` and `entropy_from_logits`
    of the full tempered logits, and the same gradients for hidden states and output weights from any
    mix of the two outputs (a policy-gradient loss minus an entropy bonus); without entropy, or with it
    as a value only, the log-probs' alone."""
    from tunesmith.losses.logprobs import linear_token_logprobs

    gen = torch.Generator().manual_seed(0)
    k, d, vocab = 7, 6, 13
    hidden = torch.randn(k, d, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, d, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, vocab, (k,), generator=gen)
    g_lp, g_ent = torch.randn(k, generator=gen), torch.randn(k, generator=gen)

    logits = (hidden @ weight.T)[None]
    want_lp = token_logprobs(logits, targets[None], temperature)[0]
    want_ent = entropy_from_logits(logits, temperature)[0]
    ((want_lp * g_lp).sum() + (want_ent * g_ent).sum()).backward()
    want = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    lp, ent = linear_token_logprobs(hidden, weight, targets, temperature, entropy=True, rows_per_chunk=3)
    assert_close(lp, want_lp.float())
    assert_close(ent, want_ent.float())
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    assert_close(hidden.grad, want[0], rtol=1e-4, atol=1e-5)  # float32 inside the chunks
    assert_close(weight.grad, want[1], rtol=1e-4, atol=1e-5)

    hidden.grad = weight.grad = None
    lp, ent = linear_token_logprobs(hidden, weight, targets, temperature, rows_per_chunk=3)
    assert ent is None
    (lp * g_lp).sum().backward()
    full = token_logprobs((hidden @ weight.T)[None], targets[None], temperature)[0]
    lp_only = torch.autograd.grad((full * g_lp).sum(), [hidden, weight])
    assert_close(hidden.grad, lp_only[0], rtol=1e-4, atol=1e-5)
    assert_close(weight.grad, lp_only[1], rtol=1e-4, atol=1e-5)

    # a frozen output layer (LoRA): the input-gradient directions come out of forward, backward only
    # scales them; the same gradients for every mix of the outputs, entropy's alone included
    frozen = weight.detach()
    for mix in ((g_lp, g_ent), (g_lp, None), (None, g_ent)):
        logits = (hidden @ frozen.T)[None]
        outs = token_logprobs(logits, targets[None], temperature)[0], entropy_from_logits(logits, temperature)[0]
        want_h = torch.autograd.grad(sum((out * g).sum() for out, g in zip(outs, mix) if g is not None), hidden)[0]
        hidden.grad = None
        lp, ent = linear_token_logprobs(hidden, frozen, targets, temperature, entropy=True, rows_per_chunk=3)
        sum((out * g).sum() for out, g in zip((lp, ent), mix) if g is not None).backward()
        assert frozen.grad is None
        assert_close(hidden.grad, want_h, rtol=1e-4, atol=1e-5)

    # the entropy as a metric (`entropy_grad=False`): the same values, no gradient, the log-probs' gradient
    # unchanged, on both paths (frozen and trained output layer)
    for w in (frozen, weight):
        hidden.grad = None
        lp, ent = linear_token_logprobs(hidden, w, targets, temperature, entropy=True, rows_per_chunk=3,
                                        entropy_grad=False)
        assert_close(ent, want_ent.float())
        assert not ent.requires_grad
        (lp * g_lp).sum().backward()
        assert_close(hidden.grad, lp_only[0], rtol=1e-4, atol=1e-5)
