"""Objectives that learn from a group's ranking or its rewards' scale rather than an advantage:
online DPO (best vs worst), best-of-N SFT (the best alone) and Trajectory Balance (log Z by VarGrad).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import LossBatch, LossParams, best_and_worst, by_group, kl_metric, require_logprobs, sequence_logprob


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
        logprobs = require_logprobs(micro)
        log_ratio = sequence_logprob(logprobs - micro.ref_logprobs, micro.mask)  # [n]
        sign = prepared["dpo_sign"].to(log_ratio.dtype)
        margin = p.beta * by_group(sign * log_ratio, k).sum(-1)  # [b] implicit-reward margin
        valid = by_group(sign, k).abs().sum(-1) > 0
        groups = norm.sequences / k
        loss = -(F.logsigmoid(margin) * valid).sum() / groups
        n_valid = max(float(valid.sum().item()), 1.0)
        chosen_reward = p.beta * by_group((sign > 0) * log_ratio, k).sum(-1)
        rejected_reward = p.beta * by_group((sign < 0) * log_ratio, k).sum(-1)
        return loss, {
            "loss": loss.item(),
            # per-prompt means over all B prompts of the full batch (tied prompts count as 0)
            "chosen_reward_margin": (margin.detach() * valid).sum().item() / groups,
            "chosen_reward": (chosen_reward.detach() * valid).sum().item() / groups,
            "rejected_reward": (rejected_reward.detach() * valid).sum().item() / groups,
            "preference_accuracy": ((margin > 0) & valid).sum().item() / groups,
            "valid_pair_frac": valid.sum().item() / groups,
            "kl": kl_metric(logprobs.detach(), micro.ref_logprobs, micro.mask, norm),
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
        logprobs = require_logprobs(micro)
        weight = prepared["sft_weight"].to(logprobs.dtype)
        loss = -(weight * sequence_logprob(logprobs, micro.mask)).sum()
        chosen = (weight > 0).float()
        groups = norm.sequences / micro.group_size
        return loss, {
            "loss": loss.item(),
            "chosen_score": (chosen * micro.scores).sum().item() / groups,
            "kl": kl_metric(logprobs.detach(), micro.ref_logprobs, micro.mask, norm),
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
        logprobs = require_logprobs(micro)
        k = micro.group_size
        # u = log pi - log ref - r/beta; the VarGrad estimate is log Z = mean_j(-u_j)
        u = sequence_logprob(logprobs - micro.ref_logprobs, micro.mask) - micro.scores / p.beta
        log_z = -by_group(u.detach(), k).mean(-1)  # [b]
        residual = log_z.repeat_interleave(k) + u
        loss = (residual**2).sum() / norm.sequences
        return loss, {
            "loss": loss.item(),
            "logZ_mean": log_z.sum().item() * k / norm.sequences,
            "kl": kl_metric(logprobs.detach(), micro.ref_logprobs, micro.mask, norm),
        }
