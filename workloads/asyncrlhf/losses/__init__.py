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

The objectives live in `policy_gradient` (RLOO, proximal RLOO, GRPO, PPO) and `preference`
(online DPO, best-of-N SFT, Trajectory Balance); what they share is in `base`. Callers import
everything from `asyncrlhf.losses`, and pick a loss by the spec's literal with `get_loss`.
"""

from __future__ import annotations

from .base import (Loss, LossBatch, LossParams, Normalizer, apply_no_eos_penalty, best_and_worst, dual_clip,
                   leave_one_out_advantages, merge_metrics, scheduled_beta, sequence_logprob, slice_prepared,
                   truncated_importance_weights)
from .policy_gradient import (GRPO, GRPO_STD_EPS, PPO, RLOO, ProximalRLOO, gae, group_normalized_advantages,
                              last_token_index, masked_whiten, ppo_token_rewards)
from .preference import BestOfNSFT, OnlineDPO, TrajectoryBalance

__all__ = [
    "GRPO", "GRPO_STD_EPS", "LOSSES", "PPO", "RLOO", "BestOfNSFT", "Loss", "LossBatch", "LossParams", "Normalizer",
    "OnlineDPO", "ProximalRLOO", "TrajectoryBalance", "apply_no_eos_penalty", "best_and_worst", "dual_clip", "gae",
    "get_loss",
    "group_normalized_advantages", "last_token_index", "leave_one_out_advantages", "masked_whiten", "merge_metrics",
    "ppo_token_rewards", "scheduled_beta", "sequence_logprob", "slice_prepared", "truncated_importance_weights",
]

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
