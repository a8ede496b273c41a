"""Training objectives as pure functions: tensors in, a scalar loss and float metrics out.

Why two phases. Some quantities must be computed over the whole batch (PPO's advantage
whitening, the chosen/rejected pick of online DPO) while the forward/backward runs on
micro-batches to fit memory. So every loss has a no-grad `prepare(full, p)` that returns
per-row tensors (first dim N), and a `__call__(micro, prepared_rows, p, norm)` that is
normalised by the counts of the FULL batch (`Normalizer`). Summing the losses (and the
metrics) of micro-batches made of whole groups then equals the full-batch value exactly;
`tests/test_losses.py` checks that invariance for every loss, gradients included.

Conventions (see docs/algorithms.md for the formulas):
- rows are B prompts x K samples, grouped consecutively: rows g*K .. g*K+K-1 are prompt g;
- a sequence log-prob is the sum of its masked token log-probs;
- every metric is additive over micro-batches (use `merge_metrics`), and is a plain float.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # api needs pydantic; the losses themselves do not
    from asyncrlhf.api import AlgorithmSpec

GRPO_STD_EPS = 1e-4  # as in DeepSeekMath's GRPO and TRL: keeps all-equal groups finite (A = 0)


@dataclass
class LossBatch:
    """B prompts x K samples flattened to N=B*K rows, grouped consecutively (rows g*K..g*K+K-1 are prompt g)."""

    logprobs: Optional[Tensor]  # [N, T] token log-probs under the current policy pi_theta (requires grad); None in prepare()
    old_logprobs: Tensor  # [N, T] token log-probs under the generating policy pi_old (temperature-scaled)
    ref_logprobs: Tensor  # [N, T] token log-probs under the reference pi_ref
    mask: Tensor  # [N, T] float, 1.0 on response tokens
    scores: Tensor  # [N] final scores (no-EOS penalty already applied by apply_no_eos_penalty)
    group_size: int  # K
    values: Optional[Tensor] = None  # [N, T] value-head outputs (ppo only, requires grad)
    old_values: Optional[Tensor] = None  # [N, T] value-head outputs before the update (ppo only)

    @property
    def rows(self) -> int:
        return self.scores.shape[0]


@dataclass(frozen=True)
class LossParams:
    """Hyper-parameters of one step (β may follow a schedule, hence a value per step)."""

    beta: float = 0.1
    kl_coef: float = 0.05
    clip_epsilon: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.1

    @classmethod
    def from_spec(cls, algo: "AlgorithmSpec", step: int) -> "LossParams":
        """The step's parameters; β moves linearly from `algo.beta` to the schedule's final value."""
        return cls(
            beta=scheduled_beta(algo.beta, algo.beta_schedule.final, algo.beta_schedule.steps, step),
            kl_coef=algo.kl_coef,
            clip_epsilon=algo.clip_epsilon,
            gamma=algo.gamma,
            lam=algo.lam,
            vf_coef=algo.vf_coef,
        )


def scheduled_beta(beta: float, final: Optional[float], steps: int, step: int) -> float:
    """Linear from `beta` (step 0) to `final` (step `steps`), constant afterwards (TBA)."""
    if final is None:
        return beta
    if steps <= 0:
        return final
    frac = min(max(step, 0) / steps, 1.0)
    return beta + frac * (final - beta)


@dataclass(frozen=True)
class Normalizer:
    """Counts of the FULL batch, so that summing the losses of micro-batches of whole groups equals the full-batch loss."""

    sequences: int
    tokens: int

    @classmethod
    def of(cls, batch: LossBatch) -> "Normalizer":
        return cls(sequences=batch.rows, tokens=int(batch.mask.sum().item()))


class Loss(Protocol):
    needs_value_head: bool

    def prepare(self, full: LossBatch, p: LossParams) -> dict[str, Tensor]: ...

    def __call__(
        self, micro: LossBatch, prepared: dict[str, Tensor], p: LossParams, norm: Normalizer
    ) -> tuple[Tensor, dict[str, float]]: ...


# ---------------------------------------------------------------------------------------------
# Helpers


def apply_no_eos_penalty(scores: Tensor, eos: Tensor, penalty: float) -> Tensor:
    """Completions that ended without EOS get the score `penalty` (replaced, not added, as in PPOv2)."""
    return torch.where(eos.bool(), scores, torch.full_like(scores, penalty))


def slice_prepared(prepared: dict[str, Tensor], rows: slice) -> dict[str, Tensor]:
    """The prepared tensors of a micro-batch's rows."""
    return {name: tensor[rows] for name, tensor in prepared.items()}


def merge_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    """Full-batch metrics from the micro-batches' metrics (they are additive by construction)."""
    merged: dict[str, float] = {}
    for part in parts:
        for name, value in part.items():
            merged[name] = merged.get(name, 0.0) + value
    return merged


def sequence_logprob(token_logprobs: Tensor, mask: Tensor) -> Tensor:
    """log pi(y|x): the sum of the masked token log-probs, [N, T] -> [N]."""
    return (token_logprobs * mask).sum(-1)


def _grouped(x: Tensor, k: int) -> Tensor:
    if x.shape[0] % k:
        raise ValueError(
            f"a batch of {x.shape[0]} rows is not made of whole groups of group_size={k}: "
            "micro-batches must hold whole prompts (a multiple of K rows)"
        )
    return x.reshape(-1, k)


def _require_logprobs(micro: LossBatch) -> Tensor:
    """The current policy's token log-probs, after checking the micro-batch holds whole groups."""
    _grouped(micro.scores, micro.group_size)
    if micro.logprobs is None:
        raise ValueError("LossBatch.logprobs is None: the loss needs the current policy's log-probs")
    return micro.logprobs


def _kl_metric(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, norm: Normalizer) -> float:
    """k1 estimate of KL per sequence on the stored samples: mean of sum_t (log pi - log pi_ref).
    The samples come from the generating policy pi_old, so this is unbiased for KL(pi || pi_ref)
    only on-policy; with stale rollouts it is E_{pi_old}[log pi - log pi_ref] (close when the
    staleness is small). A monitoring number, not a term of any loss."""
    return (sequence_logprob(logprobs - ref_logprobs, mask).sum() / norm.sequences).item()


def _kl_shaped_returns(batch: LossBatch, p: LossParams) -> Tensor:
    """R_i = score_i - c_KL * sum_t (log pi_old - log pi_ref): the sequence reward with the KL penalty."""
    return batch.scores - p.kl_coef * sequence_logprob(batch.old_logprobs - batch.ref_logprobs, batch.mask)


def leave_one_out_advantages(returns: Tensor, k: int) -> Tensor:
    """A_i = R_i - mean_{j != i} R_j over the K samples of the same prompt."""
    if k < 2:
        raise ValueError(f"leave-one-out needs group_size >= 2, got {k}")
    grouped = _grouped(returns, k)
    others = (grouped.sum(-1, keepdim=True) - grouped) / (k - 1)
    return (grouped - others).reshape(-1)


def best_and_worst(scores: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Row indices of each group's best and worst sample, and whether they differ in score.

    Ties resolve to the first index. A group whose samples all score the same carries no
    preference; callers give it zero weight rather than train on an arbitrary pair.
    """
    grouped = _grouped(scores, k)
    offsets = torch.arange(grouped.shape[0], device=scores.device) * k
    best = grouped.argmax(-1)
    worst = grouped.argmin(-1)
    distinct = grouped.max(-1).values > grouped.min(-1).values
    return offsets + best, offsets + worst, distinct


# ---------------------------------------------------------------------------------------------
# Online DPO


class OnlineDPO:
    """-log sigmoid(beta * [(log pi - log ref)(y+) - (log pi - log ref)(y-)]), best vs worst of K.

    Mean over the B prompts of the full batch; a prompt whose K scores all tie contributes 0.
    """

    needs_value_head = False

    def prepare(self, full: LossBatch, p: LossParams) -> dict[str, Tensor]:
        k = full.group_size
        if k < 2:
            raise ValueError(f"online-dpo needs group_size >= 2, got {k}")
        chosen, rejected, distinct = best_and_worst(full.scores, k)
        sign = torch.zeros_like(full.scores)
        sign[chosen[distinct]] = 1.0
        sign[rejected[distinct]] = -1.0
        return {"dpo_sign": sign}

    def __call__(self, micro, prepared, p, norm):
        k = micro.group_size
        logprobs = _require_logprobs(micro)
        log_ratio = sequence_logprob(logprobs - micro.ref_logprobs, micro.mask)  # [n]
        sign = prepared["dpo_sign"].to(log_ratio.dtype)
        margin = p.beta * _grouped(sign * log_ratio, k).sum(-1)  # [b] implicit-reward margin
        valid = _grouped(sign, k).abs().sum(-1) > 0
        groups = norm.sequences / k
        loss = -(F.logsigmoid(margin) * valid).sum() / groups
        n_valid = max(float(valid.sum().item()), 1.0)
        chosen_reward = p.beta * _grouped((sign > 0) * log_ratio, k).sum(-1)
        rejected_reward = p.beta * _grouped((sign < 0) * log_ratio, k).sum(-1)
        return loss, {
            "loss": loss.item(),
            # per-prompt means over all B prompts of the full batch (tied prompts count as 0)
            "chosen_reward_margin": (margin.detach() * valid).sum().item() / groups,
            "chosen_reward": (chosen_reward.detach() * valid).sum().item() / groups,
            "rejected_reward": (rejected_reward.detach() * valid).sum().item() / groups,
            "preference_accuracy": ((margin > 0) & valid).sum().item() / groups,
            "valid_pair_frac": valid.sum().item() / groups,
            "kl": _kl_metric(logprobs.detach(), micro.ref_logprobs, micro.mask, norm),
        }


# ---------------------------------------------------------------------------------------------
# RLOO family


class RLOO:
    """Plain RLOO: REINFORCE with the leave-one-out baseline, ratio-free: mean_i( -A_i log pi(y_i) )."""

    needs_value_head = False

    def prepare(self, full: LossBatch, p: LossParams) -> dict[str, Tensor]:
        returns = _kl_shaped_returns(full, p)
        return {"advantages": leave_one_out_advantages(returns, full.group_size), "returns": returns}

    def __call__(self, micro, prepared, p, norm):
        logprobs = _require_logprobs(micro)
        seq_logprob = sequence_logprob(logprobs, micro.mask)
        adv = prepared["advantages"].to(seq_logprob.dtype)
        loss = -(adv * seq_logprob).sum() / norm.sequences
        return loss, {
            "loss": loss.item(),
            "advantage_mean": adv.sum().item() / norm.sequences,
            "return_mean": prepared["returns"].sum().item() / norm.sequences,
            "kl": _kl_metric(logprobs.detach(), micro.ref_logprobs, micro.mask, norm),
        }


class ProximalRLOO(RLOO):
    """Proximal RLOO: the leave-one-out advantage times a clipped SEQUENCE ratio pi/pi_old.

    L = mean_i max(-A_i rho_i, -A_i clip(rho_i, 1-eps, 1+eps)), rho_i = exp(log pi(y_i) - log pi_old(y_i)).
    """

    def __call__(self, micro, prepared, p, norm):
        logprobs = _require_logprobs(micro)
        log_rho = sequence_logprob(logprobs - micro.old_logprobs, micro.mask)
        rho = torch.exp(log_rho)
        adv = prepared["advantages"].to(rho.dtype)
        clipped = torch.clamp(rho, 1.0 - p.clip_epsilon, 1.0 + p.clip_epsilon)
        per_seq = torch.maximum(-adv * rho, -adv * clipped)
        loss = per_seq.sum() / norm.sequences
        was_clipped = (-adv * clipped > -adv * rho).float()
        return loss, {
            "loss": loss.item(),
            "clip_frac": was_clipped.sum().item() / norm.sequences,
            "ratio_mean": rho.detach().sum().item() / norm.sequences,
            "advantage_mean": adv.sum().item() / norm.sequences,
            "return_mean": prepared["returns"].sum().item() / norm.sequences,
            "kl": _kl_metric(logprobs.detach(), micro.ref_logprobs, micro.mask, norm),
        }


# ---------------------------------------------------------------------------------------------
# GRPO


def group_normalized_advantages(scores: Tensor, k: int, eps: float = GRPO_STD_EPS) -> Tensor:
    """(score - group mean) / (group std + eps), std unbiased (as torch.std, TRL, DeepSeekMath)."""
    if k < 2:
        raise ValueError(f"grpo's group-normalised advantage needs group_size >= 2, got {k}")
    grouped = _grouped(scores, k)
    centred = grouped - grouped.mean(-1, keepdim=True)
    return (centred / (grouped.std(-1, keepdim=True) + eps)).reshape(-1)


def _clipped_token_surrogate(log_ratio: Tensor, adv: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-token max(-A r, -A clip(r)) and whether the clipped branch was taken."""
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - eps, 1.0 + eps)
    unclipped_loss, clipped_loss = -adv * ratio, -adv * clipped
    return torch.maximum(unclipped_loss, clipped_loss), (clipped_loss > unclipped_loss).float()


class GRPO:
    """Group-normalised advantages, token-level clipped ratio, k3 KL to the reference.

    Per token: max(-A r_t, -A clip(r_t)) + c_KL * (exp(ref_t - logpi_t) - (ref_t - logpi_t) - 1);
    summed over all response tokens and divided by the full batch's token count.
    """

    needs_value_head = False

    def prepare(self, full: LossBatch, p: LossParams) -> dict[str, Tensor]:
        return {"advantages": group_normalized_advantages(full.scores, full.group_size)}

    def __call__(self, micro, prepared, p, norm):
        logprobs = _require_logprobs(micro)
        adv = prepared["advantages"].to(logprobs.dtype)[:, None]
        surrogate, was_clipped = _clipped_token_surrogate(
            logprobs - micro.old_logprobs, adv, p.clip_epsilon
        )
        log_ref_ratio = micro.ref_logprobs - logprobs
        k3 = torch.exp(log_ref_ratio) - log_ref_ratio - 1.0
        mask = micro.mask
        pg = (surrogate * mask).sum() / norm.tokens
        kl = (k3 * mask).sum() / norm.tokens
        loss = pg + p.kl_coef * kl
        return loss, {
            "loss": loss.item(),
            "pg_loss": pg.item(),
            "kl_k3_per_token": kl.item(),
            "clip_frac": (was_clipped * mask).sum().item() / norm.tokens,
            "kl": _kl_metric(logprobs.detach(), micro.ref_logprobs, mask, norm),
        }


# ---------------------------------------------------------------------------------------------
# Best-of-N SFT


class BestOfNSFT:
    """Token-mean NLL of each group's best sample (the chosen half of online DPO, no rejected)."""

    needs_value_head = False

    def prepare(self, full: LossBatch, p: LossParams) -> dict[str, Tensor]:
        best, _, _ = best_and_worst(full.scores, full.group_size)
        chosen_tokens = full.mask.sum(-1)[best].sum().clamp(min=1.0)
        weight = torch.zeros_like(full.scores)
        weight[best] = 1.0 / chosen_tokens
        return {"sft_weight": weight}

    def __call__(self, micro, prepared, p, norm):
        logprobs = _require_logprobs(micro)
        weight = prepared["sft_weight"].to(logprobs.dtype)
        loss = -(weight * sequence_logprob(logprobs, micro.mask)).sum()
        chosen = (weight > 0).float()
        groups = norm.sequences / micro.group_size
        return loss, {
            "loss": loss.item(),
            "chosen_score": (chosen * micro.scores).sum().item() / groups,
            "kl": _kl_metric(logprobs.detach(), micro.ref_logprobs, micro.mask, norm),
        }


# ---------------------------------------------------------------------------------------------
# PPO


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last response token of each row (0 for an empty row)."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return (positions * (mask > 0)).amax(-1)


def ppo_token_rewards(batch: LossBatch, p: LossParams) -> Tensor:
    """r_t = -c_KL (log pi_old - log pi_ref) on response tokens, plus the score at the last one."""
    rewards = -p.kl_coef * (batch.old_logprobs - batch.ref_logprobs) * batch.mask
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    last = last_token_index(batch.mask)
    has_tokens = batch.mask.sum(-1) > 0
    rewards[rows[has_tokens], last[has_tokens]] += batch.scores[has_tokens].to(rewards.dtype)
    return rewards


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> Tensor:
    """Generalised advantage estimates; the value after the last response token is 0."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (unbiased variance, as PPOv2)."""
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1.0)
    return (x - mean) * torch.rsqrt(var + eps) * mask


class PPO:
    """PPOv2-style: KL-shaped token rewards, GAE, whitened advantages, clipped ratio and value loss.

    loss = [sum_t max(-A r_t, -A clip(r_t)) + vf_coef * 0.5 * sum_t max((V-R)^2, (V_clip-R)^2)] / tokens,
    V_clip = V_old + clip(V - V_old, -eps, eps) (the value clip reuses clip_epsilon, PPOv2's 0.2).
    """

    needs_value_head = True

    def prepare(self, full: LossBatch, p: LossParams) -> dict[str, Tensor]:
        if full.old_values is None:
            raise ValueError("ppo needs LossBatch.old_values (the value head before the update)")
        rewards = ppo_token_rewards(full, p)
        advantages = gae(rewards, full.old_values, full.mask, p.gamma, p.lam)
        returns = advantages + full.old_values * full.mask
        return {"advantages": masked_whiten(advantages, full.mask), "returns": returns}

    def __call__(self, micro, prepared, p, norm):
        logprobs = _require_logprobs(micro)
        if micro.values is None or micro.old_values is None:
            raise ValueError("ppo needs LossBatch.values and old_values in every micro-batch")
        mask, adv, returns = micro.mask, prepared["advantages"], prepared["returns"]
        surrogate, was_clipped = _clipped_token_surrogate(
            logprobs - micro.old_logprobs, adv.to(logprobs.dtype), p.clip_epsilon
        )
        pg = (surrogate * mask).sum() / norm.tokens
        v_clipped = micro.old_values + torch.clamp(
            micro.values - micro.old_values, -p.clip_epsilon, p.clip_epsilon
        )
        vf_unclipped, vf_clipped = (micro.values - returns) ** 2, (v_clipped - returns) ** 2
        vf = 0.5 * (torch.maximum(vf_unclipped, vf_clipped) * mask).sum() / norm.tokens
        loss = pg + p.vf_coef * vf
        return loss, {
            "loss": loss.item(),
            "pg_loss": pg.item(),
            "vf_loss": vf.item(),
            "clip_frac": (was_clipped * mask).sum().item() / norm.tokens,
            "vf_clip_frac": ((vf_clipped > vf_unclipped).float() * mask).sum().item() / norm.tokens,
            "return_mean": (returns * mask).sum().item() / norm.tokens,
            "kl": _kl_metric(logprobs.detach(), micro.ref_logprobs, mask, norm),
        }


# ---------------------------------------------------------------------------------------------
# Trajectory Balance (TBA)


class TrajectoryBalance:
    """(SG[log Z(x)] + log pi(y|x) - log ref(y|x) - r/beta)^2, log Z by VarGrad per prompt, mean over B*K.

    log Z needs the CURRENT policy's log-probs, so it is computed in __call__ from the micro-batch
    (which holds whole groups), not in prepare(); it is detached (stop-gradient).
    """

    needs_value_head = False

    def prepare(self, full: LossBatch, p: LossParams) -> dict[str, Tensor]:
        if full.group_size < 2:
            raise ValueError(f"tb's VarGrad log Z needs group_size >= 2, got {full.group_size}")
        return {}

    def __call__(self, micro, prepared, p, norm):
        logprobs = _require_logprobs(micro)
        k = micro.group_size
        # u = log pi - log ref - r/beta; the VarGrad estimate is log Z = mean_j(-u_j)
        u = sequence_logprob(logprobs - micro.ref_logprobs, micro.mask) - micro.scores / p.beta
        log_z = -_grouped(u.detach(), k).mean(-1)  # [b]
        residual = log_z.repeat_interleave(k) + u
        loss = (residual**2).sum() / norm.sequences
        return loss, {
            "loss": loss.item(),
            "logZ_mean": log_z.sum().item() * k / norm.sequences,
            "kl": _kl_metric(logprobs.detach(), micro.ref_logprobs, micro.mask, norm),
        }


LOSSES: dict[str, Loss] = {
    "online-dpo": OnlineDPO(),
    "ppo": PPO(),
    "rloo": RLOO(),
    "proximal-rloo": ProximalRLOO(),
    "grpo": GRPO(),
    "tb": TrajectoryBalance(),
    "best-of-n-sft": BestOfNSFT(),
}


def get_loss(name: str) -> Loss:
    """The loss registered under the spec's literal (AlgorithmSpec.loss)."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}") from None
