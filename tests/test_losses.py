"""The losses against values computed by hand, plus the invariances every loss must keep."""

from __future__ import annotations

import math

import pytest
import torch

from asyncrlhf.losses import (
    LOSSES,
    LossBatch,
    LossParams,
    Normalizer,
    apply_no_eos_penalty,
    get_loss,
    merge_metrics,
    slice_prepared,
)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def run_full(name: str, batch: LossBatch, p: LossParams):
    loss_fn = get_loss(name)
    with torch.no_grad():
        prepared = loss_fn.prepare(_without_grad(batch), p)
    return loss_fn(batch, prepared, p, Normalizer.of(batch))


def _without_grad(batch: LossBatch) -> LossBatch:
    return LossBatch(
        logprobs=None, old_logprobs=batch.old_logprobs, ref_logprobs=batch.ref_logprobs,
        mask=batch.mask, scores=batch.scores, group_size=batch.group_size,
        values=None, old_values=batch.old_values,
    )


def random_batch(groups: int = 4, k: int = 3, length: int = 5, seed: int = 0) -> LossBatch:
    g = torch.Generator().manual_seed(seed)
    n = groups * k
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).double()
    old = -torch.rand(n, length, generator=g, dtype=torch.float64) * 2
    return LossBatch(
        logprobs=(old + 0.1 * torch.randn(n, length, generator=g, dtype=torch.float64)).requires_grad_(),
        old_logprobs=old,
        ref_logprobs=old + 0.2 * torch.randn(n, length, generator=g, dtype=torch.float64),
        mask=mask,
        scores=torch.randn(n, generator=g, dtype=torch.float64),
        group_size=k,
        values=torch.randn(n, length, generator=g, dtype=torch.float64).requires_grad_(),
        old_values=torch.randn(n, length, generator=g, dtype=torch.float64),
    )


def _rows(batch: LossBatch, rows: slice) -> LossBatch:
    pick = lambda x: None if x is None else x[rows]  # noqa: E731
    return LossBatch(
        logprobs=pick(batch.logprobs), old_logprobs=batch.old_logprobs[rows],
        ref_logprobs=batch.ref_logprobs[rows], mask=batch.mask[rows], scores=batch.scores[rows],
        group_size=batch.group_size, values=pick(batch.values), old_values=pick(batch.old_values),
    )


# ---------------------------------------------------------------------------------------------
# Invariances, every loss


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_micro_batches_of_whole_groups_sum_to_the_full_batch(name):
    p = LossParams(beta=0.5, kl_coef=0.1)
    batch = random_batch()
    loss_fn = get_loss(name)
    with torch.no_grad():
        prepared = loss_fn.prepare(_without_grad(batch), p)
    norm = Normalizer.of(batch)

    full_loss, full_metrics = loss_fn(batch, prepared, p, norm)
    full_grads = torch.autograd.grad(full_loss, [batch.logprobs, batch.values], allow_unused=True)

    parts, grads = [], [torch.zeros_like(batch.logprobs), torch.zeros_like(batch.values)]
    k = batch.group_size
    for rows in (slice(0, k), slice(k, 4 * k)):  # uneven halves: 1 group + 3 groups
        micro = _rows(batch, rows)
        loss, metrics = loss_fn(micro, slice_prepared(prepared, rows), p, norm)
        parts.append((loss, metrics))
        part_grads = torch.autograd.grad(loss, [batch.logprobs, batch.values], allow_unused=True)
        for total, g in zip(grads, part_grads):
            if g is not None:
                total += g

    torch.testing.assert_close(sum(loss for loss, _ in parts), full_loss)
    for full_g, summed in zip(full_grads, grads):
        torch.testing.assert_close(summed, torch.zeros_like(summed) if full_g is None else full_g)
    merged = merge_metrics([m for _, m in parts])
    assert merged.keys() == full_metrics.keys()
    for key, value in full_metrics.items():
        assert merged[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_gives_a_finite_scalar_and_float_metrics(name):
    loss, metrics = run_full(name, random_batch(seed=3), LossParams())
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert "loss" in metrics and all(isinstance(v, float) for v in metrics.values())
    assert get_loss(name).needs_value_head == (name == "ppo")


def test_micro_batch_that_splits_a_group_is_rejected():
    batch = random_batch(k=3)
    loss_fn = get_loss("rloo")
    prepared = loss_fn.prepare(_without_grad(batch), LossParams())
    with pytest.raises(ValueError, match="whole groups"):
        loss_fn(_rows(batch, slice(0, 2)), slice_prepared(prepared, slice(0, 2)), LossParams(),
                Normalizer.of(batch))


@pytest.mark.parametrize("name", ["online-dpo", "rloo", "proximal-rloo", "grpo", "tb"])
def test_group_losses_reject_a_group_size_of_one(name):
    with pytest.raises(ValueError, match="group_size >= 2"):
        get_loss(name).prepare(_without_grad(random_batch(k=1)), LossParams())


def test_unknown_loss_names_the_known_ones():
    with pytest.raises(ValueError, match="online-dpo"):
        get_loss("dpo")


def test_no_eos_penalty_replaces_the_score():
    scores = t([0.3, 0.9, -0.2])
    eos = torch.tensor([True, False, True])
    assert apply_no_eos_penalty(scores, eos, -1.0).tolist() == [0.3, -1.0, -0.2]


# ---------------------------------------------------------------------------------------------
# Online DPO


def dpo_batch() -> LossBatch:
    # two prompts x K=3. Prompt 0: best = row 1 (2.0), worst = row 2 (-1.0). Prompt 1: all tie.
    return LossBatch(
        logprobs=t([[-0.3, -0.3], [-1.0, -0.5], [-2.0, -7.0],
                    [-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]]).requires_grad_(),
        old_logprobs=torch.zeros(6, 2, dtype=torch.float64),
        ref_logprobs=t([[-0.3, -0.3], [-1.2, -0.8], [-1.5, -9.0],
                        [-2.0, -2.0], [-2.0, -2.0], [-2.0, -2.0]]),
        mask=t([[1, 1], [1, 1], [1, 0], [1, 1], [1, 1], [1, 1]]),
        scores=t([0.5, 2.0, -1.0, 1.0, 1.0, 1.0]),
        group_size=3,
    )


def test_online_dpo_by_hand():
    batch = dpo_batch()
    loss, metrics = run_full("online-dpo", batch, LossParams(beta=0.1))
    # chosen row 1: log pi - log ref = (-1.0 - 0.5) - (-1.2 - 0.8) = -1.5 + 2.0 = +0.5
    # rejected row 2 (second token masked): -2.0 - (-1.5) = -0.5
    # margin = 0.1 * (0.5 - (-0.5)) = 0.1; prompt 1 ties -> contributes 0; mean over B=2 prompts
    expected = -math.log(sigmoid(0.1)) / 2  # = log(1 + e^-0.1) / 2 = 0.3221983...
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["chosen_reward_margin"] == pytest.approx(0.1 / 2)
    assert metrics["valid_pair_frac"] == pytest.approx(0.5)
    assert metrics["preference_accuracy"] == pytest.approx(0.5)

    (grad,) = torch.autograd.grad(loss, batch.logprobs)
    # d/d(margin) of -log sigmoid(m) / 2 = -(1 - sigmoid(0.1)) / 2; d margin / d token = +-beta
    g = (1 - sigmoid(0.1)) * 0.1 / 2
    expected_grad = t([[0, 0], [-g, -g], [g, 0], [0, 0], [0, 0], [0, 0]])
    torch.testing.assert_close(grad, expected_grad)


def test_online_dpo_picks_best_versus_worst_of_k():
    # K=4 scores [0.2, 0.9, -0.4, 0.1]: chosen = row 1, rejected = row 2; rows 0 and 3 unused.
    lp = torch.zeros(4, 1, dtype=torch.float64, requires_grad=True)
    batch = LossBatch(
        logprobs=lp, old_logprobs=torch.zeros(4, 1, dtype=torch.float64),
        ref_logprobs=torch.zeros(4, 1, dtype=torch.float64), mask=torch.ones(4, 1, dtype=torch.float64),
        scores=t([0.2, 0.9, -0.4, 0.1]), group_size=4,
    )
    loss, _ = run_full("online-dpo", batch, LossParams(beta=1.0))
    assert loss.item() == pytest.approx(math.log(2))  # margin 0
    (grad,) = torch.autograd.grad(loss, lp)
    # d(-log sigmoid(m))/dm at 0 = -0.5: push chosen up, rejected down, others untouched
    assert grad.flatten().tolist() == pytest.approx([0.0, -0.5, 0.5, 0.0])


# ---------------------------------------------------------------------------------------------
# RLOO


def rloo_batch() -> LossBatch:
    # one prompt x K=3, two tokens each.
    return LossBatch(
        logprobs=t([[-0.5, -0.5], [-1.5, -0.5], [-1.0, -2.0]]).requires_grad_(),
        old_logprobs=t([[-0.4, -0.4], [-1.0, -1.0], [-1.0, -1.0]]),
        ref_logprobs=t([[-0.5, -0.5], [-1.0, -1.0], [-0.8, -0.8]]),
        mask=t([[1, 1], [1, 1], [1, 1]]),
        scores=t([1.0, 0.0, 2.0]),
        group_size=3,
    )


def test_rloo_by_hand():
    batch = rloo_batch()
    loss, metrics = run_full("rloo", batch, LossParams(kl_coef=0.5))
    # sum_t(old - ref) = [0.2, 0.0, -0.4] -> R = score - 0.5 * that = [0.9, 0.0, 2.2]
    # A_0 = 0.9 - (0.0 + 2.2)/2 = -0.2;  A_1 = 0.0 - (0.9 + 2.2)/2 = -1.55;  A_2 = 2.2 - 0.45 = 1.75
    # seq log pi = [-1, -2, -3];  loss = -mean(A * logpi) = -(0.2 + 3.1 - 5.25)/3 = 0.65
    assert loss.item() == pytest.approx(0.65, rel=1e-12)
    assert metrics["return_mean"] == pytest.approx((0.9 + 0.0 + 2.2) / 3)
    (grad,) = torch.autograd.grad(loss, batch.logprobs)
    # d loss / d token of row i = -A_i / 3 (ratio-free REINFORCE)
    expected = torch.tensor([0.2, 1.55, -1.75], dtype=torch.float64)[:, None].expand(3, 2) / 3
    torch.testing.assert_close(grad, expected)


def test_rloo_advantages_sum_to_zero_per_prompt():
    batch = random_batch(groups=3, k=4)
    prepared = get_loss("rloo").prepare(_without_grad(batch), LossParams())
    sums = prepared["advantages"].reshape(3, 4).sum(-1)
    torch.testing.assert_close(sums, torch.zeros(3, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# β schedule


@pytest.mark.parametrize(
    ("final", "steps", "step", "expected"),
    [
        (None, 0, 10, 1.0),  # no schedule: constant β
        (0.05, 100, 0, 1.0),
        (0.05, 100, 50, 0.525),  # 1 + 0.5 * (0.05 - 1)
        (0.05, 100, 100, 0.05),
        (0.05, 100, 1000, 0.05),  # constant after the schedule
        (0.05, 0, 0, 0.05),  # zero-length schedule: final from the start
    ],
)
def test_beta_schedule(final, steps, step, expected):
    from asyncrlhf.api import AlgorithmSpec

    algo = AlgorithmSpec(beta=1.0, beta_schedule={"final": final, "steps": steps})
    assert LossParams.from_spec(algo, step).beta == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------
# Proximal RLOO


def test_proximal_rloo_by_hand():
    batch = rloo_batch()
    batch.logprobs = t([[-0.5, -0.5], [-1.5, -0.5], [-0.5, -1.0]]).requires_grad_()
    loss, metrics = run_full("proximal-rloo", batch, LossParams(kl_coef=0.5, clip_epsilon=0.2))
    # advantages as in test_rloo_by_hand (they use pi_old, not pi): A = [-0.2, -1.55, 1.75]
    # log rho = sum_t(logpi - old) = [-0.2, 0.0, +0.5]
    # row 0: rho = e^-0.2 = 0.8187 inside [0.8, 1.2]: max(0.2 rho, 0.2 rho) = 0.2 e^-0.2
    # row 1: rho = 1: 1.55
    # row 2: rho = e^0.5 = 1.6487, A > 0: max(-1.75 * 1.6487, -1.75 * 1.2) = -2.1 (clipped, no grad)
    expected = (0.2 * math.exp(-0.2) + 1.55 - 1.75 * 1.2) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["clip_frac"] == pytest.approx(1 / 3)
    (grad,) = torch.autograd.grad(loss, batch.logprobs)
    # d(-A rho)/d token = -A rho on the unclipped rows
    expected_grad = t([0.2 * math.exp(-0.2), 1.55, 0.0])[:, None].expand(3, 2) / 3
    torch.testing.assert_close(grad, expected_grad)


def test_proximal_rloo_equals_rloo_gradient_on_policy():
    # at pi = pi_old, rho = 1 and d rho = d log pi: same gradient as plain RLOO
    batch = random_batch(seed=5)
    batch.logprobs = batch.old_logprobs.clone().requires_grad_()
    grads = []
    for name in ("rloo", "proximal-rloo"):
        loss, _ = run_full(name, batch, LossParams())
        grads.append(torch.autograd.grad(loss, batch.logprobs)[0])
    torch.testing.assert_close(grads[0], grads[1])


# ---------------------------------------------------------------------------------------------
# GRPO


def test_grpo_by_hand():
    batch = LossBatch(
        logprobs=t([[-1.0, -1.0], [-0.5, -1.5], [-1.0, -3.0]]).requires_grad_(),
        old_logprobs=t([[-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]]),
        ref_logprobs=t([[-0.9, -1.0], [-0.5, -1.5], [-1.0, -3.0]]),
        mask=t([[1, 1], [1, 1], [1, 0]]),
        scores=t([3.0, 0.0, 0.0]),
        group_size=3,
    )
    loss, metrics = run_full("grpo", batch, LossParams(kl_coef=0.5, clip_epsilon=0.2))
    # mean 1, deviations [2, -1, -1], unbiased std sqrt((4+1+1)/2) = sqrt(3); A = dev / (sqrt(3) + 1e-4)
    s = math.sqrt(3) + 1e-4
    # token ratios r = exp(logpi - old): row0 [1, 1]; row1 [e^0.5, e^-0.5]; row2 [1, masked]
    # row0 (A=2/s):  -A r = -2/s per token
    # row1 (A=-1/s): t0 max(e^.5/s, 1.2/s) = e^.5/s; t1 max(e^-.5/s, 0.8/s) = 0.8/s (clipped)
    # row2 (A=-1/s): t0 1/s
    pg = (-2 - 2 + math.exp(0.5) + 0.8 + 1) / s / 5  # 5 response tokens
    # k3 KL: only row0 t0 has ref != logpi: ref - logpi = 0.1 -> e^0.1 - 0.1 - 1
    kl = (math.exp(0.1) - 0.1 - 1) / 5
    assert loss.item() == pytest.approx(pg + 0.5 * kl, rel=1e-12)
    assert metrics["clip_frac"] == pytest.approx(1 / 5)
    (grad,) = torch.autograd.grad(loss, batch.logprobs)
    # d(-A r)/d logpi = -A r;  d k3 / d logpi = 1 - e^(ref - logpi)
    expected = t([[-2 / s + 0.5 * (1 - math.exp(0.1)), -2 / s],
                  [math.exp(0.5) / s, 0.0],  # clipped token: no gradient
                  [1 / s, 0.0]]) / 5
    torch.testing.assert_close(grad, expected)


def test_grpo_all_equal_scores_give_zero_advantage():
    batch = random_batch(groups=2, k=3)
    batch.scores = t([0.5] * 6)
    prepared = get_loss("grpo").prepare(_without_grad(batch), LossParams())
    assert prepared["advantages"].abs().max().item() == 0.0


# ---------------------------------------------------------------------------------------------
# Best-of-N SFT


def test_best_of_n_sft_by_hand():
    batch = LossBatch(
        logprobs=t([[-9.0, -9.0], [-0.2, -0.4], [-0.6, -5.0], [-9.0, -9.0]]).requires_grad_(),
        old_logprobs=torch.zeros(4, 2, dtype=torch.float64),
        ref_logprobs=torch.zeros(4, 2, dtype=torch.float64),
        mask=t([[1, 1], [1, 1], [1, 0], [1, 1]]),
        scores=t([0.1, 0.7, 0.5, 0.5]),  # prompt 0 -> row 1; prompt 1 ties -> first, row 2
        group_size=2,
    )
    loss, _ = run_full("best-of-n-sft", batch, LossParams())
    # token-mean NLL over the chosen rows' 3 tokens: (0.2 + 0.4 + 0.6) / 3
    assert loss.item() == pytest.approx(0.4, rel=1e-12)
    (grad,) = torch.autograd.grad(loss, batch.logprobs)
    torch.testing.assert_close(grad, t([[0, 0], [-1, -1], [-1, 0], [0, 0]]) / 3)


# ---------------------------------------------------------------------------------------------
# PPO


def test_ppo_by_hand():
    batch = LossBatch(
        logprobs=t([[-1.0, -1.0 + math.log(1.5), 0.0]]).requires_grad_(),
        old_logprobs=t([[-1.0, -1.0, 0.0]]),
        ref_logprobs=t([[-1.2, -0.6, -9.0]]),
        mask=t([[1, 1, 0]]),
        scores=t([1.0]),
        group_size=1,
        values=t([[0.6, 0.9, 5.0]]).requires_grad_(),
        old_values=t([[0.5, 0.3, 7.0]]),
    )
    p = LossParams(kl_coef=0.5, gamma=1.0, lam=0.5, clip_epsilon=0.2, vf_coef=0.1)
    prepared = get_loss("ppo").prepare(_without_grad(batch), p)
    # r_t = -0.5 * (old - ref) = -0.5 * [0.2, -0.4] = [-0.1, 0.2], score 1.0 at the last token -> [-0.1, 1.2]
    # GAE: t1: delta = 1.2 + 0 - 0.3 = 0.9, A1 = 0.9
    #      t0: delta = -0.1 + 0.3 - 0.5 = -0.3, A0 = -0.3 + 1 * 0.5 * 0.9 = 0.15
    # returns = A + V_old = [0.65, 1.2]; whitening two values gives -+1/sqrt(2)
    torch.testing.assert_close(prepared["returns"], t([[0.65, 1.2, 0.0]]))
    torch.testing.assert_close(prepared["advantages"], t([[-1, 1, 0]]) / math.sqrt(2), atol=1e-6, rtol=0)

    loss, metrics = run_full("ppo", batch, p)
    a = 1 / math.sqrt(2)
    # ratios [1, 1.5]: t0 -A r = a; t1 A = +a, max(-1.5 a, -1.2 a) = -1.2 a (clipped)
    pg = (a - 1.2 * a) / 2
    # values: t0 V=0.6 (inside the clip of 0.5): (0.6-0.65)^2 = 0.0025
    #         t1 V=0.9, clipped 0.3+0.2 = 0.5: max(0.09, 0.49) = 0.49
    vf = 0.5 * (0.0025 + 0.49) / 2
    assert metrics["pg_loss"] == pytest.approx(pg, rel=1e-6)
    assert metrics["vf_loss"] == pytest.approx(vf, rel=1e-12)
    assert loss.item() == pytest.approx(pg + 0.1 * vf, rel=1e-6)
    assert metrics["clip_frac"] == pytest.approx(0.5)
    g_lp, g_v = torch.autograd.grad(loss, [batch.logprobs, batch.values])
    torch.testing.assert_close(g_lp, t([[a / 2, 0.0, 0.0]]), atol=1e-6, rtol=0)
    # d/dV of 0.1 * 0.5 * (V - R)^2 / 2 at t0 = 0.1 * (0.6 - 0.65) / 2; t1 clipped -> 0
    torch.testing.assert_close(g_v, t([[0.1 * -0.05 / 2, 0.0, 0.0]]))


def test_ppo_gae_with_lambda_one_is_the_return_to_go():
    batch = random_batch(groups=2, k=2, length=4, seed=7)
    p = LossParams(gamma=1.0, lam=1.0)
    from asyncrlhf.losses import gae, ppo_token_rewards

    rewards = ppo_token_rewards(_without_grad(batch), p)
    adv = gae(rewards, batch.old_values, batch.mask, 1.0, 1.0)
    to_go = rewards.flip(-1).cumsum(-1).flip(-1) * batch.mask
    torch.testing.assert_close(adv, to_go - batch.old_values * batch.mask)


# ---------------------------------------------------------------------------------------------
# Trajectory Balance


def test_tb_by_hand():
    batch = LossBatch(
        logprobs=t([[-1.0], [-2.0]]).requires_grad_(),
        old_logprobs=t([[-1.0], [-2.0]]),
        ref_logprobs=t([[-1.5], [-1.0]]),
        mask=t([[1], [1]]),
        scores=t([1.0, 0.0]),
        group_size=2,
    )
    loss, metrics = run_full("tb", batch, LossParams(beta=0.5))
    # u = logpi - ref - r/beta = [0.5 - 2, -1 - 0] = [-1.5, -1.0];  log Z = -mean(u) = 1.25
    # residual = log Z + u = [-0.25, 0.25];  loss = mean(residual^2) = 0.0625
    assert loss.item() == pytest.approx(0.0625, rel=1e-12)
    assert metrics["logZ_mean"] == pytest.approx(1.25)
    (grad,) = torch.autograd.grad(loss, batch.logprobs)
    # log Z is stop-gradient: d/dlogpi = 2 * residual / N
    torch.testing.assert_close(grad, t([[-0.25], [0.25]]))


def test_tb_gradient_is_reinforce_with_mean_baseline_on_kl_regularised_reward():
    # Per-sample identity: residual = log Z + u = -(R~ - mean_group R~) with
    # R~ = r/beta - (log pi - log ref), so grad L_tb = 2 * grad of -mean(SG[R~ - mean R~] log pi).
    batch = random_batch(seed=11)
    p = LossParams(beta=0.3)
    loss, _ = run_full("tb", batch, p)
    (g_tb,) = torch.autograd.grad(loss, batch.logprobs)
    seq = (batch.logprobs * batch.mask).sum(-1)
    reward = (batch.scores / p.beta - (seq - (batch.ref_logprobs * batch.mask).sum(-1))).detach()
    centred = reward - reward.reshape(-1, batch.group_size).mean(-1).repeat_interleave(batch.group_size)
    (g_pg,) = torch.autograd.grad(-(centred * seq).mean(), batch.logprobs)
    torch.testing.assert_close(g_tb, 2 * g_pg)


def test_tb_expected_gradient_on_policy_is_the_kl_regularised_objective_gradient():
    # A categorical policy over 5 one-token answers. On-policy, E[grad L_tb] =
    # -2 (K-1)/K grad_theta J(theta), J = E_pi[r]/beta - KL(pi || pi_ref): the mean baseline includes the
    # sample itself, which scales the leave-one-out (unbiased) estimator by (K-1)/K.
    gen = torch.Generator().manual_seed(0)
    beta, k, chunks, groups = 0.5, 4, 20, 500
    theta = torch.tensor([0.3, -0.2, 0.1, 0.5, -0.4], dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.tensor([0.0, 0.4, -0.3, 0.2, 0.1], dtype=torch.float64), -1)
    reward = torch.tensor([1.0, 0.0, 0.5, -0.5, 0.2], dtype=torch.float64)

    log_pi = torch.log_softmax(theta, -1)
    objective = (log_pi.exp() * (reward / beta - (log_pi - ref))).sum()
    (target,) = torch.autograd.grad(objective, theta)
    target = -2 * (k - 1) / k * target

    chunk_grads = []
    for _ in range(chunks):
        y = torch.multinomial(log_pi.detach().exp(), groups * k, replacement=True, generator=gen)
        lp = torch.log_softmax(theta, -1)[y][:, None]
        batch = LossBatch(logprobs=lp, old_logprobs=lp.detach(), ref_logprobs=ref[y][:, None],
                          mask=torch.ones_like(lp), scores=reward[y], group_size=k)
        loss, _ = run_full("tb", batch, LossParams(beta=beta))
        chunk_grads.append(torch.autograd.grad(loss, theta)[0])
    grads = torch.stack(chunk_grads)
    mean, stderr = grads.mean(0), grads.std(0) / math.sqrt(chunks)
    assert target.abs().max() > 10 * stderr.max()  # the check is not vacuous
    assert ((mean - target).abs() <= 4 * stderr).all(), (mean, target, stderr)


def test_the_registry_has_one_loss_for_each_literal_of_the_spec():
    from typing import get_args

    from asyncrlhf.api import LossName

    assert sorted(LOSSES) == sorted(get_args(LossName))
    with pytest.raises(ValueError, match="known losses"):
        get_loss("dpo")
