"""The spec's `tracking` and `eval` sections: where the curves go, and how the policy is evaluated.

Both run in the learner process (rank 0): it has every step's metrics, the snapshot of each
version, and the reference model's path. Neither changes what is trained.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator

from .base import SpecModel
from .task import PromptSource

TrackerName = Literal["tensorboard", "wandb", "mlflow"]


class TrackingSpec(SpecModel):
    """Experiment trackers: every step's metrics, the job's config and the final summary."""

    backends: list[TrackerName] = Field(
        default_factory=list, max_length=3,
        description="Trackers to log to (tensorboard, wandb, mlflow); empty = none. TensorBoard writes "
        "event files into the run directory; wandb runs offline with WANDB_MODE=offline; mlflow logs to "
        "MLFLOW_TRACKING_URI. Each needs its extra: pip install 'asyncrlhf[tensorboard,wandb,mlflow]'.",
    )
    project: str = Field(
        "asyncrlhf", min_length=1, max_length=128,
        description="wandb project and MLflow experiment the run is logged under.",
    )
    run_name: str = Field("", max_length=128, description="Run name in the trackers; empty = the job's name.")
    credentials_secret: str = Field(
        "", max_length=253,
        description="Secret whose keys become the learner's environment (WANDB_API_KEY, WANDB_MODE, "
        "MLFLOW_TRACKING_URI, MLFLOW_TRACKING_TOKEN, ...); credentials never go in the spec.",
    )

    @field_validator("backends")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        twice = sorted({b for b in value if value.count(b) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} listed more than once: name each tracker once")
        return value


class EvalSpec(SpecModel):
    """Evaluation on held-out prompts with the task's reward, in the learner process."""

    every_steps: int = Field(
        0, ge=0, le=10_000_000,
        description="Evaluate every this many steps and after the last one; 0 = no evaluation. A multiple "
        "of weightSync.everySteps: the evaluation samples from that step's snapshot.",
    )
    before_training: bool = Field(True, description="Also evaluate the initial policy (step 0): the baseline.")
    prompts: PromptSource = Field(
        default_factory=PromptSource,
        description="Held-out prompts (same fields as task.prompts). A built-in task is drawn with a separate "
        "seed; a dataset or file task must name its held-out split or file here (e.g. split: test).",
    )
    num_prompts: int = Field(64, ge=1, le=100_000, description="Held-out prompts per evaluation (the same each time).")
    samples: int = Field(4, ge=1, le=256, description="Fresh completions sampled per held-out prompt.")
    temperature: Optional[float] = Field(
        None, gt=0, le=10,
        description="Sampling temperature of the evaluation (π and π_ref are scaled by it for the KL); "
        "unset = generator.sampling.temperature, the distribution the learner trains.",
    )
