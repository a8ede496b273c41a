"""The `AsyncRLHFJob` API: one set of pydantic models, the single source of truth.

The CRD in `crds/` is generated from these models (`asyncrlhf crd`), the operator validates
with them, and the workloads read their configuration through them. Every default lives
here and nowhere else. Field names are camelCase in YAML (aliases) and snake_case in Python.

Keep the models structural-schema friendly: no unions other than Optional, enums as Literal,
bounds as ge/le, a description on every field (it becomes the CRD's documentation).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "asyncrlhf.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "AsyncRLHFJob"
PLURAL = "asyncrlhfjobs"
SINGULAR = "asyncrlhfjob"
SHORT_NAMES = ["arj"]

LossName = Literal["online-dpo", "ppo", "rloo", "proximal-rloo", "grpo", "tb", "best-of-n-sft"]
BUILTIN_MODEL_PREFIX = "builtin:"


class _Model(BaseModel):
    """Base: camelCase aliases, unknown fields rejected (typos must not pass silently)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_default=True
    )


class ModelSpec(_Model):
    """Which weights are trained, which are the frozen reference, and how they are loaded."""

    policy: str = Field(
        "builtin:tiny-sort",
        description="Policy to train: a Hugging Face hub id, a path on a mounted volume, or "
        "'builtin:tiny-sort' (a tiny Llama built locally, for the built-in task).",
        min_length=1, max_length=1024,
    )
    reference: str = Field(
        "", description="Frozen reference policy for the KL terms; empty means the initial policy.",
        max_length=1024,
    )
    tokenizer: str = Field("", description="Tokenizer id or path; empty means the policy's.", max_length=1024)
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Parameter dtype for generation and training (bfloat16 on GPUs)."
    )


class PromptSource(_Model):
    """Where prompts come from."""

    source: Literal["builtin", "dataset", "file"] = Field(
        "builtin", description="builtin: a toy task shipped with asyncrlhf; dataset: a hub "
        "dataset id; file: a JSONL file on a mounted volume."
    )
    name: str = Field(
        "sort-digits", description="builtin task name (sort-digits) or hub dataset id."
    )
    path: str = Field("", description="JSONL file path (source=file).")
    split: str = Field("train", description="Dataset split (source=dataset).")
    field: str = Field("prompt", description="Record field that holds the prompt text.")
    answer_field: str = Field(
        "answer",
        description="Record field with the reference answer, passed to rule verifiers.",
    )


class OnePassHead(_Model):
    """Online one-pass reward head (Li et al. 2025) over a frozen model's features."""

    feature_model: str = Field(
        "",
        description="Frozen model whose last-layer embedding is the feature map; empty = policy.",
    )
    lambda_: float = Field(1.0, alias="lambda", gt=0, description="Initial Hessian λI.")
    bound: float = Field(10.0, gt=0, description="Projection radius B on the head's norm.")
    eta: float = Field(1.0, gt=0, description="Mirror-descent step size η.")


class RewardSpec(_Model):
    """How a completion is scored."""

    kind: Literal["rule", "model", "onepass"] = Field(
        "rule", description="rule: a programmatic verifier; model: a sequence-classification "
        "reward model; onepass: a linear head learned online from preferences."
    )
    rule: str = Field("sort-digits", description="Verifier name for kind=rule (sort-digits, gsm8k).")
    model: str = Field("", description="Reward model id or path for kind=model.")
    onepass: OnePassHead = Field(default_factory=OnePassHead, description="Settings for kind=onepass.")
    no_eos_penalty: float = Field(
        -1.0,
        description="Score given to completions that end without EOS (paper: -1 TL;DR, -10 chatbot).",
    )


class TaskSpec(_Model):
    """Prompts and reward."""

    prompts: PromptSource = Field(default_factory=PromptSource, description="Prompt source.")
    reward: RewardSpec = Field(default_factory=RewardSpec, description="Reward function.")


class BetaSchedule(_Model):
    """Linear β schedule (TBA): from `beta` to `final` over `steps` steps, then constant."""

    final: Optional[float] = Field(None, gt=0, description="Final β; unset = constant β.")
    steps: int = Field(0, ge=0, description="Steps over which β moves linearly to `final`.")


class AlgorithmSpec(_Model):
    """The loss and its hyper-parameters (see docs/algorithms.md)."""

    loss: LossName = Field("online-dpo", description="Training objective.")
    beta: float = Field(0.1, gt=0, description="β of online DPO and Trajectory Balance.")
    beta_schedule: BetaSchedule = Field(
        default_factory=BetaSchedule, description="Optional β schedule."
    )
    kl_coef: float = Field(0.05, ge=0, description="KL penalty coefficient c_KL.")
    samples_per_prompt: int = Field(
        4, ge=1, le=256, description="Completions per prompt K."
    )
    clip_epsilon: float = Field(0.2, gt=0, lt=1, description="Ratio clip ε.")
    updates_per_batch: int = Field(
        1, ge=1, le=64, description="Optimizer passes over each batch."
    )
    gamma: float = Field(1.0, ge=0, le=1, description="PPO discount γ.")
    lam: float = Field(0.95, ge=0, le=1, description="PPO GAE λ.")
    vf_coef: float = Field(0.1, ge=0, description="PPO value-loss coefficient.")


class ReplayBufferSpec(_Model):
    """TBA replay buffer; used when `enabled` (the default for loss=tb)."""

    enabled: Optional[bool] = Field(None, description="Use the buffer; unset = only for loss=tb.")
    capacity: int = Field(10000, ge=1, description="Maximum completions kept.")
    recency_probability: float = Field(
        0.95, ge=0, le=1,
        description="Probability m of sampling from items added since the last sync.",
    )
    sampling: Literal["uniform", "reward", "recency"] = Field(
        "uniform", description="How the non-recent draw picks items: uniform or softmax(score)."
    )


class AsyncSpec(_Model):
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


class SamplingSpec(_Model):
    """Sampling parameters of the generators."""

    temperature: float = Field(0.7, gt=0, le=10, description="Sampling temperature T.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling p.")
    max_tokens: int = Field(16, ge=1, le=32768, description="Max response tokens.")


class PodResources(_Model):
    """CPU and memory of a pod (a learner pod's GPUs are `learner.gpusPerNode`)."""

    cpu: str = Field("1", description="CPU request.")
    memory: str = Field("4Gi", description="Memory request and limit.")


class Resources(PodResources):
    """Container resources of a generator pod. `gpus` becomes a `nvidia.com/gpu` limit."""

    gpus: int = Field(0, ge=0, le=64, description="nvidia.com/gpu per pod.")


class GeneratorSpec(_Model):
    """Rollout generators: stateless, scalable at any time."""

    replicas: int = Field(1, ge=0, le=1024, description="Generator processes (pods).")
    engine: Literal["vllm", "hf"] = Field("vllm", description="Inference engine.")
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="Sampling parameters.")
    memory_fraction: float = Field(
        0.85, gt=0, le=1, description="vLLM gpu_memory_utilization on GPUs (weights + KV cache)."
    )
    kv_cache_gib: float = Field(
        0.5, gt=0, le=1024, alias="kvCacheGiB", description="KV cache size in GiB on CPUs (vLLM's CPU build)."
    )
    resources: Resources = Field(default_factory=Resources, description="Per-pod resources.")


class OptimizerSpec(_Model):
    """AdamW settings."""

    lr: float = Field(3e-6, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    schedule: Literal["constant", "linear"] = Field(
        "constant", description="LR after warm-up: constant or linear decay to 0."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clip.")


class LearnerSpec(_Model):
    """The learner: one or more training processes."""

    nodes: int = Field(1, ge=1, le=1024, description="Learner pods (Indexed Job completions).")
    gpus_per_node: int = Field(0, ge=0, le=16, description="GPUs per learner pod.")
    processes_per_node: int = Field(
        1, ge=1, le=64,
        description="Training processes per pod when gpusPerNode is 0 (CPU).",
    )
    backend: Literal["torch", "deepspeed"] = Field("torch", description="Training backend.")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    offload: bool = Field(False, description="DeepSpeed CPU offload of optimizer state.")
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec, description="Optimizer.")
    prompts_per_step: int = Field(
        16, ge=1, le=65536, description="Prompts per optimizer step."
    )
    micro_batch_size: int = Field(
        0, ge=0,
        description="Sequences per forward/backward (gradient accumulation); 0 = whole batch.",
    )
    total_steps: int = Field(100, ge=1, description="Optimizer steps to run.")
    seed: int = Field(0, ge=0, description="Seed for prompts, sampling and initialisation.")
    backoff_limit: int = Field(
        3, ge=0, le=100, description="Learner restarts before the job fails."
    )
    resources: PodResources = Field(default_factory=PodResources, description="Per-pod CPU and memory.")


class VolumeSnapshotSpec(_Model):
    """CSI VolumeSnapshots of the snapshot volume (cluster only): backups of the checkpoints."""

    enabled: bool = Field(False, description="Take VolumeSnapshots of the volume as the job trains.")
    every_steps: int = Field(
        500, ge=1, le=10_000_000,
        description="Take one each time the learner passes a multiple of this many steps.",
    )
    keep: int = Field(3, ge=1, le=100, description="VolumeSnapshots kept; older ones are deleted.")
    class_name: str = Field(
        "", max_length=253, description="VolumeSnapshotClass; empty = the cluster's default class."
    )


class WeightSyncSpec(_Model):
    """Snapshots on a shared volume; checkpoints for resume are written with them."""

    every_steps: int = Field(
        1, ge=1, le=100000, description="k: publish a snapshot every k steps."
    )
    volume_claim: str = Field(
        "", description="Existing ReadWriteMany PVC; empty = create one."
    )
    size: str = Field("20Gi", description="Size of the created PVC.")
    storage_class: str = Field("", description="Storage class; empty = default.")
    keep_snapshots: int = Field(
        3, ge=1, le=1000, description="Snapshots kept (plus any still in use)."
    )
    retain_volume: bool = Field(
        True,
        description="Keep the created PVC (and the VolumeSnapshots) when the job is deleted (else they "
        "are deleted with the job).",
    )
    volume_snapshots: VolumeSnapshotSpec = Field(
        default_factory=VolumeSnapshotSpec,
        description="CSI VolumeSnapshots of the volume every N steps: restore one into a PVC and name it "
        "in weightSync.volumeClaim to resume from its checkpoint.",
    )


class NatsSpec(_Model):
    """The bus. Empty url: the chart's NATS (cluster) or an embedded nats-server (local)."""

    url: str = Field("", description="nats:// URL; empty = default.")
    credentials_secret: str = Field(
        "",
        description="Secret with key 'creds' (a NATS .creds file) or 'user'/'password'.",
    )
    max_bytes: int = Field(
        1 << 30, ge=1 << 20,
        description="Stream size limit; publishers back off when full (no data is discarded).",
    )
    ack_wait_seconds: float = Field(
        60.0, gt=0,
        description="Seconds before an unacknowledged message is redelivered (crash recovery).",
    )


class JobSpec(_Model):
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
    image: str = Field(
        "ghcr.io/asyncrlhf/workloads:0.1.0", description="Container image of generator and learner."
    )
    suspend: bool = Field(False, description="Scale everything to zero, keeping stream and snapshots.")
    ttl_seconds_after_finished: Optional[int] = Field(
        None, ge=0,
        description="Delete the job this many seconds after it finished; unset = keep.",
    )

    @model_validator(mode="after")
    def _cross_field(self) -> "JobSpec":
        for rule in CROSS_FIELD_RULES:
            if not rule.check(self):
                raise ValueError(f"{rule.path}: {rule.message}")
        return self


class CrossFieldRule:
    """A constraint across fields, enforced here and emitted as a CEL rule in the CRD."""

    def __init__(self, path: str, cel: str, message: str, check) -> None:
        self.path, self.cel, self.message, self.check = path, cel, message, check


# Each rule is written twice by necessity — once in CEL for the apiserver, once in Python —
# and kept side by side so they cannot drift; tests/test_api.py checks both agree.
CROSS_FIELD_RULES: list[CrossFieldRule] = [
    CrossFieldRule(
        "async.maxStaleness",
        "self.async.mode == 'sync' ? self.weightSync.everySteps == 1 "
        ": self.async.maxStaleness >= self.weightSync.everySteps - 1",
        "the staleness bound N must be at least weightSync.everySteps - 1 (a snapshot every k "
        "steps cannot keep rollouts within fewer than k-1 versions); sync mode needs everySteps 1",
        lambda s: (s.weight_sync.every_steps == 1) if s.async_.mode == "sync"
        else s.async_.max_staleness >= s.weight_sync.every_steps - 1,
    ),
    CrossFieldRule(
        "algorithm.samplesPerPrompt",
        "!(self.algorithm.loss in ['online-dpo', 'rloo', 'proximal-rloo', 'grpo', 'tb']) "
        "|| self.algorithm.samplesPerPrompt >= 2",
        "this loss compares completions of the same prompt: set samplesPerPrompt to 2 or more",
        lambda s: s.algorithm.loss not in ("online-dpo", "rloo", "proximal-rloo", "grpo", "tb")
        or s.algorithm.samples_per_prompt >= 2,
    ),
    CrossFieldRule(
        "task.prompts.path",
        "self.task.prompts.source != 'file' || self.task.prompts.path != ''",
        "prompts.source is 'file': set prompts.path to a JSONL file on a mounted volume",
        lambda s: s.task.prompts.source != "file" or s.task.prompts.path != "",
    ),
    CrossFieldRule(
        "task.reward.model",
        "self.task.reward.kind != 'model' || self.task.reward.model != ''",
        "reward.kind is 'model': set reward.model to a reward model id or path",
        lambda s: s.task.reward.kind != "model" or s.task.reward.model != "",
    ),
    CrossFieldRule(
        "learner.offload",
        "self.learner.backend == 'deepspeed' || !self.learner.offload",
        "offload needs backend 'deepspeed'",
        lambda s: s.learner.backend == "deepspeed" or not s.learner.offload,
    ),
]


# Fields a running job cannot change: the checkpoint holds this model's weights and optimizer
# state, and the released batches have this many prompts. The CRD rejects a change with a CEL
# transition rule (`self == oldSelf`); the operator also compares against what it recorded at
# creation (for an old CRD), and the job fails with SpecInvalid until the field is set back.
IMMUTABLE_FIELDS: tuple[str, ...] = ("model", "learner.promptsPerStep")
IMMUTABLE_MESSAGE = "is immutable: it cannot change while the job exists (set it back, or create a new job)"


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


class ObjectMeta(_Model):
    """The subset of Kubernetes metadata a job manifest uses."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")
    name: str = Field(
        ..., min_length=1, max_length=40, pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$",
        description="Job name: lower-case letters, digits and '-', starting with a letter (a DNS-1035 "
        "label, as Service names need), at most 40 characters so child names fit.",
    )
    namespace: str = Field("default", description="Namespace.")
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class Condition(_Model):
    """A standard Kubernetes condition."""

    type: str = Field(description="Ready, Progressing, Suspended, Succeeded, Failed or SpecInvalid.")
    status: Literal["True", "False", "Unknown"] = Field(description="Whether the condition holds.")
    reason: str = Field("", description="CamelCase reason for the last transition.")
    message: str = Field("", description="What happened, for people.")
    last_transition_time: str = Field("", description="When the status last changed (RFC 3339).")


class JobStatus(_Model):
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


class AsyncRLHFJob(_Model):
    """An asynchronous RLHF job: the manifest users `kubectl apply` or `asyncrlhf run`."""

    api_version: Literal["asyncrlhf.dev/v1alpha1"] = Field(API_VERSION)
    kind: Literal["AsyncRLHFJob"] = KIND
    metadata: ObjectMeta
    spec: JobSpec = Field(default_factory=JobSpec)
    status: Optional[JobStatus] = None

    def to_manifest(self) -> dict[str, Any]:
        """The manifest as YAML-ready camelCase data, defaults filled in."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")
