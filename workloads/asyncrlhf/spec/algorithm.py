"""The spec's `algorithm` and `async` sections: the loss, and how far generation may run ahead."""

from __future__ import annotations

import warnings
from typing import Literal, Optional

from pydantic import Field, model_validator

from .base import LossName, SpecModel

# The losses that read the generator's (behaviour) log-probs: the ratio pi/pi_old or the KL shaping of the
# reward uses them (losses/base.py). online-dpo, tb and best-of-n-sft use the reference and the current
# policy only.
BEHAVIOUR_LOGPROB_LOSSES = ("rloo", "proximal-rloo", "grpo", "ppo")
RATIO_CLIPPED_LOSSES = ("proximal-rloo", "grpo", "ppo")


class BetaSchedule(SpecModel):
    """Linear β schedule (TBA): from `beta` to `final` over `steps` steps, then constant."""

    final: Optional[float] = Field(None, gt=0, le=1000, description="Final β; unset = constant β.")
    steps: int = Field(0, ge=0, le=10_000_000, description="Steps over which β moves linearly to `final`.")


class AlgorithmSpec(SpecModel):
    """The loss and its hyper-parameters (see docs/algorithms.md)."""

    loss: LossName = Field("online-dpo", description="Training objective.")
    beta: float = Field(
        0.1, gt=0, le=1000,
        description="β: the KL coefficient of every loss (online DPO's and TB's β, the c_KL of the KL "
        "penalty of rloo, proximal-rloo, grpo and ppo): they all regularise towards the same "
        "optimum pi_ref exp(r/β).",
    )
    beta_schedule: BetaSchedule = Field(
        default_factory=BetaSchedule, description="Optional β schedule."
    )
    kl_coef: Optional[float] = Field(
        None, ge=0, le=1000,
        description="Deprecated: c_KL is β. When set (older manifests), it is still the KL coefficient of "
        "rloo, proximal-rloo, grpo and ppo (β stays that of online-dpo and tb); move the value to beta.",
    )
    old_logprobs: Literal["behaviour", "learner"] = Field(
        "behaviour",
        description="Source of pi_old in the ratio and the KL penalty: behaviour = the generator's "
        "log-probs (true importance ratios), learner = recomputed with the learner's weights at the "
        "start of the step (one extra forward without gradients, as the reference async code).",
    )
    dual_clip: Optional[float] = Field(
        None, gt=1, le=100,
        description="Dual-clip constant c > 1 for the ratio-clipped losses (proximal-rloo, grpo, ppo): a "
        "sample with a negative advantage A contributes at most -c A to the loss; unset = no bound.",
    )
    importance_cap: Optional[float] = Field(
        None, ge=1, le=1000,
        description="With oldLogprobs learner: weight each sample (rloo, proximal-rloo: the sequence; grpo, "
        "ppo: each token) by the truncated importance weight min(pi_old / pi_behaviour, cap), which "
        "corrects for the generator's staleness; unset = no correction.",
    )
    value_head: Literal["shared", "detached"] = Field(
        "shared",
        description="ppo's value head: shared = its loss also trains the policy's trunk (PPOv2 with one "
        "model); detached = a linear head on the trunk's detached last hidden state (the value loss "
        "trains the head only).",
    )
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

    @property
    def kl_coefficient(self) -> float:
        """c_KL: β, unless the deprecated klCoef is set."""
        return self.beta if self.kl_coef is None else self.kl_coef

    @model_validator(mode="after")
    def _warn_deprecated(self) -> "AlgorithmSpec":
        if self.kl_coef is not None:
            warnings.warn(f"algorithm.klCoef is deprecated: the KL coefficient of every loss is algorithm.beta "
                          f"(c_KL = β); klCoef {self.kl_coef:g} still applies to {self.loss}'s KL penalty, "
                          "move it to beta", FutureWarning, stacklevel=2)
        return self

class ReplayBufferSpec(SpecModel):
    """TBA replay buffer; used when `enabled` (the default for loss=tb)."""

    enabled: Optional[bool] = Field(None, description="Use the buffer; unset = only for loss=tb.")
    capacity: int = Field(10000, ge=1, le=10_000_000, description="Maximum completions kept.")
    recency_probability: float = Field(
        0.95, ge=0, le=1,
        description="Probability m of sampling from items added since the last sync.",
    )
    sampling: Literal["uniform", "reward", "recency"] = Field(
        "uniform", description="How the non-recent draw picks items: uniform or softmax(score / temperature)."
    )
    temperature: float = Field(
        1.0, gt=0, le=1000,
        description="τ of reward sampling, softmax(score / τ): lower favours high scores more (the paper: 1).",
    )
    generate_samples: int = Field(
        0, ge=0, le=256,
        description="S: completions generated per prompt while the buffer is on; the step trains on "
        "algorithm.samplesPerPrompt (K) of them drawn by the buffer's rule. 0 = K.",
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
