"""Policy-gradient objectives: RLOO, proximal RLOO, GRPO and PPO (advantage-weighted log-probs).

They differ in the baseline (leave-one-out, group-normalised, a learned value with GAE) and in
whether the update is clipped against the generating policy; formulas in docs/algorithms.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import (LossBatch, LossParams, by_group, dual_clip, kl_metric, kl_shaped_returns,
                   leave_one_out_advantages, require_logprobs, sequence_logprob, truncated_importance_weights)

GRPO_STD_EPS = 1e-4  # as in DeepSeekMath's GRPO and TRL: keeps all-equal groups finite (A = 0)


def with_importance_weights(prepared: dict[str, Tensor], full: LossBatch, p: LossParams,
                            per_token: bool) -> dict[str, Tensor]:
    """`prepared` plus the truncated importance weights (algorithm.importanceCap), when there are any."""
    weights = truncated_importance_weights(full, p, per_token)
    return prepared if weights is None else {**prepared, "is_weight": weights}


def _weighted(terms: Tensor, prepared: dict[str, Tensor], metrics: dict[str, float], norm_count: float,
              mask: Tensor | None = None) -> Tensor:
    """The loss terms times their importance weights (if any), reporting the weights' mean."""
    weights = prepared.get("is_weight")
    if weights is None:
        return terms
    metrics["is_weight_mean"] = ((weights * mask).sum() if mask is not None else weights.sum()).item() / norm_count
    return terms * weights.to(terms.dtype)


# ---------------------------------------------------------------------------------------------
# RLOO family


class RLOO:
    """Plain RLOO: REINFORCE with the leave-one-out baseline, ratio-free: mean_i( -A_i log pi(y_i) )."""

    needs_value_head = False

    def prepare(self, full: LossBatch, p: LossParams) -> dict[str, Tensor]:
        returns = kl_shaped_returns(full, p)
        prepared = {"advantages": leave_one_out_advantages(returns, full.group_size), "returns": returns}
        return with_importance_weights(prepared, full, p, per_token=False)

    def __call__(self, micro, prepared, p, norm):
        logprobs = require_logprobs(micro)
        seq_logprob = sequence_logprob(logprobs, micro.mask)
        adv = prepared["advantages"].to(seq_logprob.dtype)
        metrics: dict[str, float] = {}
        loss = _weighted(-(adv * seq_logprob), prepared, metrics, norm.sequences).sum() / norm.sequences
        return loss, {
            "loss": loss.item(),
            "advantage_mean": adv.sum().item() / norm.sequences,
            "return_mean": prepared["returns"].sum().item() / norm.sequences,
            "kl": kl_metric(logprobs.detach(), micro.ref_logprobs, micro.mask, norm),
            **metrics,
        }


class ProximalRLOO(RLOO):
    """Proximal RLOO: the leave-one-out advantage times a clipped SEQUENCE ratio pi/pi_old.

    L = mean_i max(-A_i rho_i, -A_i clip(rho_i, 1-eps, 1+eps)), rho_i = exp(log pi(y_i) - log pi_old(y_i));
    with dualClip c a term with A_i < 0 is at most -c A_i; with importanceCap each term is weighted by
    min(pi_old(y_i) / pi_behaviour(y_i), cap).
    """

    def __call__(self, micro, prepared, p, norm):
        logprobs = require_logprobs(micro)
        log_rho = sequence_logprob(logprobs - micro.old_logprobs, micro.mask)
        rho = torch.exp(log_rho)
        adv = prepared["advantages"].to(rho.dtype)
        clipped = torch.clamp(rho, 1.0 - p.clip_epsilon, 1.0 + p.clip_epsilon)
        per_seq, dual = dual_clip(torch.maximum(-adv * rho, -adv * clipped), adv, p.dual_clip)
        metrics = {"dual_clip_frac": dual.sum().item() / norm.sequences} if p.dual_clip is not None else {}
        loss = _weighted(per_seq, prepared, metrics, norm.sequences).sum() / norm.sequences
        was_clipped = (-adv * clipped > -adv * rho).float()
        return loss, {
            **metrics,
            "loss": loss.item(),
            "clip_frac": was_clipped.sum().item() / norm.sequences,
            "ratio_mean": rho.detach().sum().item() / norm.sequences,
            "advantage_mean": adv.sum().item() / norm.sequences,
            "return_mean": prepared["returns"].sum().item() / norm.sequences,
            "kl": kl_metric(logprobs.detach(), micro.ref_logprobs, micro.mask, norm),
        }


# ---------------------------------------------------------------------------------------------
# GRPO


def group_normalized_advantages(scores: Tensor, k: int, eps: float = GRPO_STD_EPS) -> Tensor:
    """(score - group mean) / (group std + eps), std unbiased (as torch.std, TRL, DeepSeekMath)."""
    if k < 2:
        raise ValueError(f"grpo's group-normalised advantage needs group_size >= 2, got {k}")
    grouped = by_group(scores, k)
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
        prepared = {"advantages": group_normalized_advantages(full.scores, full.group_size)}
        return with_importance_weights(prepared, full, p, per_token=True)

    def __call__(self, micro, prepared, p, norm):
        logprobs = require_logprobs(micro)
        adv = prepared["advantages"].to(logprobs.dtype)[:, None]
        surrogate, was_clipped = _clipped_token_surrogate(
            logprobs - micro.old_logprobs, adv, p.clip_epsilon
        )
        mask = micro.mask
        surrogate, dual = dual_clip(surrogate, adv, p.dual_clip)
        metrics = {"dual_clip_frac": (dual * mask).sum().item() / norm.tokens} if p.dual_clip is not None else {}
        surrogate = _weighted(surrogate, prepared, metrics, norm.tokens, mask)
        log_ref_ratio = micro.ref_logprobs - logprobs
        k3 = torch.exp(log_ref_ratio) - log_ref_ratio - 1.0
        pg = (surrogate * mask).sum() / norm.tokens
        kl = (k3 * mask).sum() / norm.tokens
        loss = pg + p.kl_coef * kl
        return loss, {
            "loss": loss.item(),
            "pg_loss": pg.item(),
            "kl_k3_per_token": kl.item(),
            **metrics,
            "clip_frac": (was_clipped * mask).sum().item() / norm.tokens,
            "kl": kl_metric(logprobs.detach(), micro.ref_logprobs, mask, norm),
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
        prepared = {"advantages": masked_whiten(advantages, full.mask), "returns": returns}
        return with_importance_weights(prepared, full, p, per_token=True)

    def __call__(self, micro, prepared, p, norm):
        logprobs = require_logprobs(micro)
        if micro.values is None or micro.old_values is None:
            raise ValueError("ppo needs LossBatch.values and old_values in every micro-batch")
        mask, adv, returns = micro.mask, prepared["advantages"], prepared["returns"]
        adv = adv.to(logprobs.dtype)
        surrogate, was_clipped = _clipped_token_surrogate(logprobs - micro.old_logprobs, adv, p.clip_epsilon)
        surrogate, dual = dual_clip(surrogate, adv, p.dual_clip)
        metrics = {"dual_clip_frac": (dual * mask).sum().item() / norm.tokens} if p.dual_clip is not None else {}
        surrogate = _weighted(surrogate, prepared, metrics, norm.tokens, mask)
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
            **metrics,
            "kl": kl_metric(logprobs.detach(), micro.ref_logprobs, mask, norm),
        }
