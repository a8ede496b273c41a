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
