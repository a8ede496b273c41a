"""The spec's `generator` and `learner` sections: the processes, their sizes and resources."""

from __future__ import annotations

from typing import Literal, NamedTuple

from pydantic import Field, model_validator

from .base import DNS_LABEL, SpecModel
from .lora import LoraSpec
from .observability import AutoscaleSpec
from .pods import QUANTITY, PodTemplate


class SamplingSpec(SpecModel):
    """Sampling parameters of the generators."""

    temperature: float = Field(0.7, gt=0, le=10, description="Sampling temperature T.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling p.")
    max_tokens: int = Field(16, ge=1, le=32768, description="Max response tokens.")


class PodResources(SpecModel):
    """CPU and memory of a pod (a learner pod's GPUs are `learner.gpusPerNode`)."""

    cpu: str = Field("1", pattern=QUANTITY, description="CPU request (a Kubernetes quantity: 1, 500m).")
    memory: str = Field("4Gi", pattern=QUANTITY, description="Memory request and limit (a quantity: 4Gi).")


class Resources(PodResources):
    """Container resources of a generator pod. `gpus` becomes a `nvidia.com/gpu` limit."""

    gpus: int = Field(0, ge=0, le=64, description="nvidia.com/gpu per pod.")


class SearcherSpec(SpecModel):
    """A group of generators with its own weight-sync interval (TBA's "searchers")."""

    name: str = Field(..., min_length=1, max_length=20, pattern=DNS_LABEL,
                      description="Group name (a DNS label; its Deployment is <job>-generator-<name>).")
    replicas: int = Field(1, ge=0, le=1024, description="Generators of this group (part of generator.replicas).")
    sync_every: int = Field(
        1, ge=1, le=1024,
        description="Load new weights only every syncEvery published snapshots (staleness up to "
        "syncEvery x weightSync.everySteps - 1 versions; a prompt's staleness bound still wins).",
    )


class GeneratorGroup(NamedTuple):
    """One group of generators: name ("" = the default group), how many, and its sync interval."""

    name: str
    replicas: int
    sync_every: int


class GeneratorSpec(SpecModel):
    """Rollout generators: stateless, scalable at any time."""

    replicas: int = Field(1, ge=0, le=1024, description="Generator processes (pods).")
    searchers: list[SearcherSpec] = Field(
        default_factory=list, max_length=16,
        description="TBA searchers: groups of generators, each with its own syncEvery, carved out of "
        "replicas (the rest form the default group, which syncs with every snapshot).",
    )
    autoscale: AutoscaleSpec = Field(
        default_factory=AutoscaleSpec, description="With enabled, the generators scale themselves from the bus's "
        "signals between minReplicas and maxReplicas, and replicas is the autoscaler's.",
    )
    engine: Literal["vllm", "hf"] = Field("vllm", description="Inference engine.")
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="Sampling parameters.")
    memory_fraction: float = Field(
        0.85, gt=0, le=1, description="vLLM gpu_memory_utilization on GPUs (weights + KV cache)."
    )
    tensor_parallel_size: int = Field(
        0, ge=0, le=64,
        description="GPUs one vLLM engine spans (tensor parallelism; must divide the model's attention "
        "heads); 0 = every GPU of the generator not given to a dedicated reward model.",
    )
    kv_cache_gib: float = Field(
        0.5, gt=0, le=1024, alias="kvCacheGiB", description="KV cache size in GiB on CPUs (vLLM's CPU build)."
    )
    resources: Resources = Field(default_factory=Resources, description="Per-pod resources.")
    pod_template: PodTemplate = Field(
        default_factory=PodTemplate,
        description="Merged over the generator pods: scheduling, pull secrets, env, volumes, extra resources.",
    )

    @model_validator(mode="after")
    def _check_searchers(self) -> "GeneratorSpec":
        names = [s.name for s in self.searchers]
        if len(set(names)) != len(names):
            raise ValueError(f"generator.searchers: names must be unique, got {names}")
        carved = sum(s.replicas for s in self.searchers)
        if carved > self.replicas:
            raise ValueError(f"generator.searchers: their replicas add up to {carved}, more than generator.replicas "
                             f"({self.replicas}); the searchers are part of replicas, raise it to at least {carved}")
        if self.searchers and self.autoscale.enabled:
            raise ValueError("generator.searchers and generator.autoscale cannot be combined (the autoscaler "
                             "would resize the groups' shares): remove one of them")
        return self

    def groups(self) -> list[GeneratorGroup]:
        """The default group (what the searchers leave of replicas, syncing with every snapshot)
        first, then each searcher; generator index i belongs to the group its cumulative count covers."""
        rest = self.replicas - sum(s.replicas for s in self.searchers)
        return [GeneratorGroup("", rest, 1)] + [GeneratorGroup(s.name, s.replicas, s.sync_every)
                                               for s in self.searchers]

    def group_of(self, index: int) -> GeneratorGroup:
        """The group of generator `index` (0-based) under `groups()`."""
        end = 0
        for group in self.groups():
            end += group.replicas
            if index < end:
                return group
        raise IndexError(f"generator {index} is beyond generator.replicas ({self.replicas})")

    def group_named(self, name: str) -> GeneratorGroup:
        for group in self.groups():
            if group.name == name:
                return group
        raise ValueError(f"no generator group named {name!r} in generator.searchers "
                         f"(known: {[g.name for g in self.groups()]})")


class OptimizerSpec(SpecModel):
    """AdamW settings."""

    lr: float = Field(3e-6, gt=0, le=1, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, le=10, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, le=10_000_000, description="Linear warm-up steps.")
    schedule: Literal["constant", "linear"] = Field(
        "constant", description="LR after warm-up: constant or linear decay to 0."
    )
    max_grad_norm: float = Field(1.0, gt=0, le=1e6, description="Gradient-norm clip.")


class LearnerSpec(SpecModel):
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
    offload_reference: bool = Field(
        False,
        description="Keep the frozen reference model in host memory and move it to the GPU only for its "
        "forward pass (frees its GPU memory for training; costs two copies of its weights per step).",
    )
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec, description="Optimizer.")
    lora: LoraSpec = Field(
        default_factory=LoraSpec, description="Train a LoRA adapter (PEFT) instead of the whole policy; snapshots "
        "then carry only the adapter.",
    )
    prompts_per_step: int = Field(
        16, ge=1, le=65536, description="Prompts per optimizer step."
    )
    micro_batch_size: int = Field(
        0, ge=0, le=65536,
        description="Sequences per forward/backward (gradient accumulation); 0 = whole batch.",
    )
    total_steps: int = Field(100, ge=1, le=10_000_000, description="Optimizer steps to run.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed for prompts, sampling and initialisation.")
    backoff_limit: int = Field(
        3, ge=0, le=100, description="Learner restarts before the job fails."
    )
    resources: PodResources = Field(default_factory=PodResources, description="Per-pod CPU and memory.")
    pod_template: PodTemplate = Field(
        default_factory=PodTemplate,
        description="Merged over the learner pods: scheduling, pull secrets, env, volumes, extra resources.",
    )
