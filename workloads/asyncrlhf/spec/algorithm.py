"""The spec's `algorithm` and `async` sections: the loss, and how far generation may run ahead."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from .base import LossName, SpecModel


class BetaSchedule(SpecModel):
    """Linear β schedule (TBA): from `beta` to `final` over `steps` steps, then constant."""

    final: Optional[float] = Field(None, gt=0, le=1000, description="Final β; unset = constant β.")
    steps: int = Field(0, ge=0, le=10_000_000, description="Steps over which β moves linearly to `final`.")


class AlgorithmSpec(SpecModel):
    """The loss and its hyper-parameters (see docs/algorithms.md)."""

    loss: LossName = Field("online-dpo", description="Training objective.")
    beta: float = Field(0.1, gt=0, le=1000, description="β of online DPO and Trajectory Balance.")
    beta_schedule: BetaSchedule = Field(
        default_factory=BetaSchedule, description="Optional β schedule."
    )
    kl_coef: float = Field(0.05, ge=0, le=1000, description="KL penalty coefficient c_KL.")
    samples_per_prompt: int = Field(
        4, ge=1, le=256, description="Completions per prompt K."
    )
    clip_epsilon: float = Field(0.2, gt=0, lt=1, description="Ratio clip ε.")
    updates_per_batch: int = Field(
        1, ge=1, le=64, description="Optimizer passes over each batch."
    )
    gamma: float = Field(1.0, ge=0, le=1, description="PPO discount γ.")
    lam: float = Field(0.95, ge=0, le=1, description="PPO GAE λ.")
    vf_coef: float = Field(0.1, ge=0, le=1000, description="PPO value-loss coefficient.")


class ReplayBufferSpec(SpecModel):
    """TBA replay buffer; used when `enabled` (the default for loss=tb)."""

    enabled: Optional[bool] = Field(None, description="Use the buffer; unset = only for loss=tb.")
    capacity: int = Field(10000, ge=1, le=10_000_000, description="Maximum completions kept.")
    recency_probability: float = Field(
        0.95, ge=0, le=1,
        description="Probability m of sampling from items added since the last sync.",
    )
    sampling: Literal["uniform", "reward", "recency"] = Field(
        "uniform", description="How the non-recent draw picks items: uniform or softmax(score)."
    )


class AsyncSpec(SpecModel):
    """Asynchrony: how far generation may run ahead of learning."""

    mode: Literal["async", "sync"] = Field(
        "async", description="async: generate and learn at once; sync: the on-policy baseline."
    )
    max_staleness: int = Field(
        1, ge=0, le=1024,
        description="N: a rollout is at most N policy versions older than the step using it.",
    )
    replay_buffer: ReplayBufferSpec = Field(
        default_factory=ReplayBufferSpec, description="Replay buffer (TBA)."
    )

    @property
    def effective_staleness(self) -> int:
        return 0 if self.mode == "sync" else self.max_staleness
