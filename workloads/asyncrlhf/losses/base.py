"""What every loss shares: the batch and parameter types, the full-batch normaliser, the `Loss`
interface, and the group arithmetic (leave-one-out, best/worst of a group) several losses use.

Kept apart from the losses themselves so that each objective's module reads as its formula and
nothing else; see the package docstring for the two-phase (prepare, then micro-batches) contract.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:  # api needs pydantic; the losses themselves do not
    from asyncrlhf.api import AlgorithmSpec


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
    # [N, T] the generator's own log-probs when old_logprobs were recomputed by the learner
    # (algorithm.oldLogprobs: learner); None: old_logprobs ARE the behaviour log-probs
    behaviour_logprobs: Optional[Tensor] = None

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
    dual_clip: Optional[float] = None  # c > 1: a negative-advantage term is at most -c A (Ye et al. 2020)
    importance_cap: Optional[float] = None  # truncated importance weight min(pi_old / pi_behaviour, cap)

    @classmethod
    def from_spec(cls, algo: "AlgorithmSpec", step: int) -> "LossParams":
        """The step's parameters; β moves linearly from `algo.beta` to the schedule's final value, and
        c_KL is that β (unless the deprecated klCoef is set)."""
        beta = scheduled_beta(algo.beta, algo.beta_schedule.final, algo.beta_schedule.steps, step)
        return cls(
            beta=beta,
            kl_coef=beta if algo.kl_coef is None else algo.kl_coef,
            clip_epsilon=algo.clip_epsilon,
            gamma=algo.gamma,
            lam=algo.lam,
            vf_coef=algo.vf_coef,
            dual_clip=algo.dual_clip,
            importance_cap=algo.importance_cap,
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


def by_group(x: Tensor, k: int) -> Tensor:
    if x.shape[0] % k:
        raise ValueError(
            f"a batch of {x.shape[0]} rows is not made of whole groups of group_size={k}: "
            "micro-batches must hold whole prompts (a multiple of K rows)"
        )
    return x.reshape(-1, k)


def require_logprobs(micro: LossBatch) -> Tensor:
    """The current policy's token log-probs, after checking the micro-batch holds whole groups."""
    by_group(micro.scores, micro.group_size)
    if micro.logprobs is None:
        raise ValueError("LossBatch.logprobs is None: the loss needs the current policy's log-probs")
    return micro.logprobs


def kl_metric(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, norm: Normalizer) -> float:
    """k1 estimate of KL per sequence on the stored samples: mean of sum_t (log pi - log pi_ref).
    The samples come from the generating policy pi_old, so this is unbiased for KL(pi || pi_ref)
    only on-policy; with stale rollouts it is E_{pi_old}[log pi - log pi_ref] (close when the
    staleness is small). A monitoring number, not a term of any loss."""
    return (sequence_logprob(logprobs - ref_logprobs, mask).sum() / norm.sequences).item()


def kl_shaped_returns(batch: LossBatch, p: LossParams) -> Tensor:
    """R_i = score_i - c_KL * sum_t (log pi_old - log pi_ref): the sequence reward with the KL penalty."""
    return batch.scores - p.kl_coef * sequence_logprob(batch.old_logprobs - batch.ref_logprobs, batch.mask)


def dual_clip(per_term: Tensor, adv: Tensor, c: Optional[float]) -> tuple[Tensor, Tensor]:
    """Dual clip (Ye et al. 2020): where A < 0 a loss term is at most -c A (its gradient is then 0), so
    a sample whose ratio pi/pi_old ran far above 1 cannot dominate; terms with A >= 0 are unchanged.
    Returns the terms and where the bound was taken (float)."""
    if c is None:
        return per_term, torch.zeros_like(per_term)
    bounded = torch.where(adv < 0, torch.minimum(per_term, -c * adv), per_term)
    return bounded, (bounded < per_term).float()


def truncated_importance_weights(batch: LossBatch, p: LossParams, per_token: bool) -> Optional[Tensor]:
    """min(pi_old / pi_behaviour, cap), without gradient: per sequence ([N]) or per token ([N, T]).
    None when there is nothing to correct (no cap, or old_logprobs are the behaviour log-probs)."""
    if p.importance_cap is None or batch.behaviour_logprobs is None:
        return None
    log_w = (batch.old_logprobs - batch.behaviour_logprobs) * batch.mask
    if not per_token:
        log_w = log_w.sum(-1)
    return torch.exp(torch.clamp(log_w, max=math.log(p.importance_cap))).detach()


def leave_one_out_advantages(returns: Tensor, k: int) -> Tensor:
    """A_i = R_i - mean_{j != i} R_j over the K samples of the same prompt."""
    if k < 2:
        raise ValueError(f"leave-one-out needs group_size >= 2, got {k}")
    grouped = by_group(returns, k)
    others = (grouped.sum(-1, keepdim=True) - grouped) / (k - 1)
    return (grouped - others).reshape(-1)


def best_and_worst(scores: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Row indices of each group's best and worst sample, and whether they differ in score.

    Ties resolve to the first index. A group whose samples all score the same carries no
    preference; callers give it zero weight rather than train on an arbitrary pair.
    """
    grouped = by_group(scores, k)
    offsets = torch.arange(grouped.shape[0], device=scores.device) * k
    best = grouped.argmax(-1)
    worst = grouped.argmin(-1)
    distinct = grouped.max(-1).values > grouped.min(-1).values
    return offsets + best, offsets + worst, distinct
