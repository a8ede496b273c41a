"""The `AsyncRLHFJob` API: one set of pydantic models, the single source of truth.

The CRD in `crds/` is generated from these models (`asyncrlhf crd`), the operator validates
with them, and the workloads read their configuration through them. Every default lives
here and nowhere else. Field names are camelCase in YAML (aliases) and snake_case in Python.

This module is the resource (identity, `JobSpec`, `AsyncRLHFJob`, status, immutable fields) and
the one import for every model: the spec's sections live in `asyncrlhf.spec` (one module per
part of the job) and are re-exported here, so `from asyncrlhf import api; api.LearnerSpec` and
`from asyncrlhf.api import LearnerSpec` are the ways to reach them.

Keep the models structural-schema friendly: no unions other than Optional, enums as Literal,
bounds as ge/le, a description on every field (it becomes the CRD's documentation).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError
from pydantic.alias_generators import to_camel

from .spec.algorithm import AlgorithmSpec, AsyncSpec, BetaSchedule, ReplayBufferSpec
from .spec.base import BUILTIN_MODEL_PREFIX, DNS_LABEL, IMAGE, LossName, SpecModel
from .spec.observability import AutoscaleSpec, MetricsSpec
from .spec.plumbing import NatsSpec, VolumeSnapshotSpec, WeightSyncSpec
from .spec.pods import ModelCacheSpec, PodTemplate, PodTemplateMetadata, SecretKey
from .spec.reporting import EvalSpec, TrackerName, TrackingSpec
from .spec.processes import (
    GeneratorSpec, LearnerSpec, OptimizerSpec, PodResources, Resources, SamplingSpec,
)
from .spec.rules import CROSS_FIELD_RULES, CrossFieldRule
from .spec.task import (
    REWARD_CODE_DIR, HttpAuth, HttpReward, ModelSpec, OnePassHead, PromptSource, RewardSource, RewardSpec,
    RewardTerm, TaskSpec,
)

__all__ = [
    "GROUP", "VERSION", "API_VERSION", "KIND", "PLURAL", "SINGULAR", "SHORT_NAMES",
    "BUILTIN_MODEL_PREFIX", "LossName", "SpecModel",
    "ModelSpec", "PromptSource", "OnePassHead", "RewardSpec", "TaskSpec",
    "REWARD_CODE_DIR", "HttpAuth", "HttpReward", "RewardSource", "RewardTerm",
    "BetaSchedule", "AlgorithmSpec", "ReplayBufferSpec", "AsyncSpec",
    "SamplingSpec", "PodResources", "Resources", "GeneratorSpec", "OptimizerSpec", "LearnerSpec",
    "VolumeSnapshotSpec", "WeightSyncSpec", "NatsSpec",
    "TrackerName", "TrackingSpec", "EvalSpec", "MetricsSpec", "AutoscaleSpec",
    "PodTemplate", "PodTemplateMetadata", "SecretKey", "ModelCacheSpec",
    "JobSpec", "CrossFieldRule", "CROSS_FIELD_RULES",
    "IMMUTABLE_FIELDS", "IMMUTABLE_MESSAGE", "immutable_values",
    "REQUIRED_FIELDS", "REQUIRED_MESSAGE", "missing_required",
    "ObjectMeta", "Condition", "JobStatus", "AsyncRLHFJob",
]

GROUP = "asyncrlhf.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "AsyncRLHFJob"
PLURAL = "asyncrlhfjobs"
SINGULAR = "asyncrlhfjob"
SHORT_NAMES = ["arj"]


class JobSpec(SpecModel):
    """Desired state of an asynchronous RLHF job."""

    model: ModelSpec = Field(default_factory=ModelSpec, description="Policy, reference, tokenizer.")
    task: TaskSpec = Field(default_factory=TaskSpec, description="Prompts and reward.")
    algorithm: AlgorithmSpec = Field(default_factory=AlgorithmSpec, description="Loss settings.")
    async_: AsyncSpec = Field(default_factory=AsyncSpec, alias="async", description="Asynchrony.")
    generator: GeneratorSpec = Field(default_factory=GeneratorSpec, description="Generators.")
    learner: LearnerSpec = Field(default_factory=LearnerSpec, description="Learner.")
    weight_sync: WeightSyncSpec = Field(
        default_factory=WeightSyncSpec, description="Weight sync and storage."
    )
    nats: NatsSpec = Field(default_factory=NatsSpec, description="NATS JetStream connection.")
    tracking: TrackingSpec = Field(
        default_factory=TrackingSpec, description="Experiment trackers (TensorBoard, wandb, MLflow)."
    )
    eval_: EvalSpec = Field(
        default_factory=EvalSpec, alias="eval", description="Evaluation on held-out prompts during training."
    )
    metrics: MetricsSpec = Field(
        default_factory=MetricsSpec, description="Prometheus metrics of the learner and generators."
    )
    image: str = Field(
        "ghcr.io/asyncrlhf/workloads:0.1.0", max_length=512, pattern=IMAGE,
        description="Container image of generator and learner.",
    )
    suspend: bool = Field(False, description="Scale everything to zero, keeping stream and snapshots.")
    ttl_seconds_after_finished: Optional[int] = Field(
        None, ge=0, le=10 * 365 * 24 * 3600,
        description="Delete the job this many seconds after it finished; unset = keep.",
    )
    progress_deadline_seconds: Optional[int] = Field(
        None, ge=60, le=7 * 24 * 3600,
        description="A running job whose learner step has not advanced for this long gets the Stalled "
        "condition (and fails when failOnStall); unset = never.",
    )
    fail_on_stall: bool = Field(
        False, description="Fail the job (phase Failed, reason ProgressDeadlineExceeded) once it is Stalled.",
    )

    @model_validator(mode="after")
    def _cross_field(self) -> "JobSpec":
        failed = [rule for rule in CROSS_FIELD_RULES if not rule.check(self)]
        if failed:  # every failing rule at once, each at its own field (as the CRD's fieldPath)
            dumped = self.model_dump(by_alias=True, mode="json")
            raise ValidationError.from_exception_data("JobSpec", [
                {"type": PydanticCustomError("cross_field", rule.message), "loc": tuple(rule.path.split(".")),
                 "input": _value_at(dumped, rule.path)} for rule in failed])
        return self


def _value_at(data: Any, path: str) -> Any:
    for part in path.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


# Fields a running job cannot change: the checkpoint holds this model's weights and optimizer
# state, and the released batches have this many prompts. The CRD rejects a change with a CEL
# transition rule (`self == oldSelf`); the operator also compares against what it recorded at
# creation (for an old CRD), and the job fails with SpecInvalid until the field is set back.
IMMUTABLE_FIELDS: tuple[str, ...] = (
    "model.policy", "model.reference", "model.tokenizer", "model.dtype", "learner.promptsPerStep",
)
IMMUTABLE_MESSAGE = "is immutable: it cannot change while the job exists (set it back, or create a new job)"


# Fields a manifest must set although the model has a default (which `JobSpec()` in Python keeps):
# a job applied with no spec must not start the built-in toy job on a cluster by surprise. The CRD
# marks them required (no default on their path); `asyncrlhf run` and `validate` refuse a manifest
# without them (manifest.parse_manifest).
REQUIRED_FIELDS: tuple[str, ...] = ("model.policy",)
REQUIRED_MESSAGE = ("required: name the policy to train (a hub id such as org/model, a path on a mounted "
                    "volume, or builtin:tiny-sort for the built-in toy task)")


def missing_required(spec: Any) -> list[str]:
    """The REQUIRED_FIELDS (as `spec.<path>`) that a manifest's raw spec does not set."""
    missing = []
    for path in REQUIRED_FIELDS:
        value = spec
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            missing.append(f"spec.{path}")
    return missing


def immutable_values(spec: JobSpec) -> dict[str, Any]:
    """{path: value} of IMMUTABLE_FIELDS, defaults filled in, as JSON values."""
    dumped = spec.model_dump(by_alias=True, mode="json")
    values = {}
    for path in IMMUTABLE_FIELDS:
        value: Any = dumped
        for part in path.split("."):
            value = value[part]
        values[path] = value
    return values


class ObjectMeta(SpecModel):
    """The subset of Kubernetes metadata a job manifest uses."""

    # labels and annotations keep Kubernetes' own limits (256 KiB of annotations), not the spec's
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow",
                              str_max_length=256 * 1024)
    name: str = Field(
        ..., min_length=1, max_length=40, pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$",
        description="Job name: lower-case letters, digits and '-', starting with a letter (a DNS-1035 "
        "label, as Service names need), at most 40 characters so child names fit.",
    )
    namespace: str = Field(
        "default", max_length=63, pattern=DNS_LABEL,
        description="Namespace (a DNS-1123 label; it names the job's NATS subjects, so no '.', '*' or '>').",
    )
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class Condition(SpecModel):
    """A standard Kubernetes condition."""

    type: str = Field(description="Ready, Progressing, Suspended, Succeeded, Failed or SpecInvalid.")
    status: Literal["True", "False", "Unknown"] = Field(description="Whether the condition holds.")
    reason: str = Field("", description="CamelCase reason for the last transition.")
    message: str = Field("", max_length=32768, description="What happened, for people.")
    last_transition_time: str = Field("", description="When the status last changed (RFC 3339).")


class AutoscaleSignals(SpecModel):
    """One interval's signals, as the autoscaler saw them (autoscale.observe)."""

    learner_wait_fraction: float = Field(0.0, ge=0, le=1, description="Of the interval, the learner waited.")
    generator_idle_fraction: float = Field(0.0, ge=0, le=1,
                                           description="Mean over the generators measured: idle (no prompts, "
                                           "or waiting for weights).")
    prompts_pending: int = Field(0, ge=0, le=1 << 31, description="Released prompts no generator has taken.")
    ready: int = Field(0, ge=0, le=1 << 20, description="Generators serving.")


class AutoscaleDecision(SpecModel):
    """A change of the generator count the autoscaler made."""

    time: str = Field("", max_length=40, description="When (RFC 3339).")
    from_replicas: int = Field(0, ge=0, le=1 << 20, description="Generators before.")
    to_replicas: int = Field(0, ge=0, le=1 << 20, description="Generators after.")
    reason: str = Field("", max_length=1024, description="Why, in words.")
    signals: AutoscaleSignals = Field(default_factory=AutoscaleSignals, description="What it was decided on.")


class AutoscaleStatus(SpecModel):
    """The generator autoscaler's view (spec.generator.autoscale; docs/operator.md)."""

    desired: int = Field(0, ge=0, le=1 << 20, description="Generators the autoscaler wants now.")
    last_check_time: str = Field("", max_length=40, description="When it last looked at the signals (RFC 3339).")
    last_check: str = Field("", max_length=1024, description="What it concluded then (or why it could not).")
    signals: Optional[AutoscaleSignals] = Field(None, description="The last interval's signals.")
    last_decision: Optional[AutoscaleDecision] = Field(None, description="The last change it made.")


class JobStatus(SpecModel):
    """Observed state, written by the operator (cluster) or the local runner."""

    phase: Literal["Pending", "Running", "Suspended", "Succeeded", "Failed"] = Field(
        "Pending", description="Where the job is in its life."
    )
    conditions: list[Condition] = Field(default_factory=list, description="Standard conditions.")
    observed_generation: int = Field(0, description="The spec generation this status describes.")
    step: int = Field(0, description="Learner optimizer steps done.")
    policy_version: int = Field(0, description="Version of the newest announced weights snapshot.")
    generator_versions: dict[str, int] = Field(
        default_factory=dict, description="Policy version each live generator has loaded."
    )
    staleness_mean: float = Field(0.0, description="Mean policy versions a used rollout lagged the learner.")
    staleness_max: int = Field(0, description="Largest lag seen.")
    rollouts_produced: int = Field(0, description="Rollout groups the generators published.")
    rollouts_consumed: int = Field(0, description="Rollout groups the learner trained on.")
    rollouts_dropped: int = Field(0, description="Rollout groups dropped as too stale (their prompts redone).")
    reward_mean: Optional[float] = Field(None, description="Mean reward of the last step's rollouts.")
    tokens_per_second: float = Field(0.0, description="Generated tokens per second, all generators.")
    restarts: int = Field(0, description="Learner restarts from checkpoint so far.")
    start_time: str = Field("", description="When the job started running (RFC 3339).")
    completion_time: str = Field("", description="When the job finished (RFC 3339).")
    last_snapshot: str = Field("", description="Path of the newest snapshot on the volume.")
    volume_snapshots: list[str] = Field(
        default_factory=list, description="VolumeSnapshots taken of the volume and kept, oldest first."
    )
    total_steps: int = Field(0, description="learner.totalSteps of the spec this status describes.")
    progress: str = Field("", description="step/totalSteps, for `kubectl get`.")
    generators: str = Field("", description="Generator pods ready/desired, for `kubectl get`.")
    replicas: int = Field(0, description="Generator pods ready (the scale subresource's status replicas).")
    selector: str = Field("", description="Label selector of the generator pods (for HPA/KEDA).")
    last_progress_time: str = Field("", description="When the learner's step last advanced (RFC 3339).")
    autoscale: Optional[AutoscaleStatus] = Field(None, description="The generator autoscaler, when enabled.")


class AsyncRLHFJob(SpecModel):
    """An asynchronous RLHF job: the manifest users `kubectl apply` or `asyncrlhf run`."""

    api_version: Literal["asyncrlhf.dev/v1alpha1"] = Field(API_VERSION)
    kind: Literal["AsyncRLHFJob"] = KIND
    metadata: ObjectMeta
    spec: JobSpec = Field(default_factory=JobSpec)
    status: Optional[JobStatus] = None

    def to_manifest(self) -> dict[str, Any]:
        """The manifest as YAML-ready camelCase data, defaults filled in."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")
