"""The spec's `generator` and `learner` sections: the processes, their sizes and resources."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import SpecModel
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


class GeneratorSpec(SpecModel):
    """Rollout generators: stateless, scalable at any time."""

    replicas: int = Field(1, ge=0, le=1024, description="Generator processes (pods).")
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
