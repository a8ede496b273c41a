"""Device placement, pure: a spec and a machine's GPUs → every process's devices and environment.

Why one planning function: the local runner sets each child's CUDA_VISIBLE_DEVICES from it,
`asyncrlhf run --dry-run` prints it, and the workloads choose their torch devices with the rules
below (`learner_device`, `generator_devices`), so what the plan shows is what runs.

The conventions (the ones torchrun, vLLM and a Kubernetes pod already follow):
  * GPUs are handed out learner first (its ranks contiguous: neighbours share NVLink on most
    boxes), then each generator in turn; the sets are disjoint.
  * The learner's ranks on a machine all see the learner's GPUs (CUDA_VISIBLE_DEVICES = that
    set, as in a pod) and rank l computes on cuda:l (LOCAL_RANK): NCCL needs its peers visible
    to use peer-to-peer copies and NVLink. Each rank still has one GPU of its own.
  * A generator sees only its own GPUs. vLLM spans the first `tensorParallelSize` of them (0 =
    all of them but a dedicated reward GPU); a reward or feature model (`task.reward.kind` model
    or onepass) runs on the generator's first GPU (`task.reward.device: generator`, in what vLLM
    leaves free) or on its last (`dedicated`).
  * A process without GPUs on a machine that has some gets CUDA_VISIBLE_DEVICES="" so it cannot
    land on GPU 0 by accident.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from .api import JobSpec

CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|CREDS|CREDENTIAL|(^|_)KEY($|_)", re.IGNORECASE)
MASK = "****"


class PlacementError(ValueError):
    """A job that cannot be placed on the GPUs it was given (or that its process can see)."""


@dataclass(frozen=True)
class GeneratorLayout:
    """How one generator uses its GPUs (indices in its own CUDA_VISIBLE_DEVICES numbering)."""

    gpus: int
    tensor_parallel: int  # vLLM tensor_parallel_size (1 on CPU)
    reward_gpu: Optional[int]  # where the reward/feature model runs; None: no such model, or CPU


@dataclass(frozen=True)
class ProcessPlan:
    """One process that would start: what it computes on and the variables that say so."""

    role: str  # "learner" | "generator"
    index: int  # learner rank or generator index
    gpus: tuple[str, ...]  # the machine's GPUs this process computes on (its own)
    device: str  # torch device of its main model, in its own numbering ("cuda:1", "cpu")
    dtype: str
    tensor_parallel: int = 1
    reward_device: str = ""  # generators scoring with a model: where that model runs
    env: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"


@dataclass(frozen=True)
class Placement:
    machine_gpus: tuple[str, ...]
    processes: tuple[ProcessPlan, ...]

    def of(self, role: str, index: int) -> ProcessPlan:
        for p in self.processes:
            if p.role == role and p.index == index:
                return p
        raise KeyError(f"no {role} {index} in the plan")

    @property
    def unused(self) -> tuple[str, ...]:
        used = {g for p in self.processes for g in p.gpus}
        return tuple(g for g in self.machine_gpus if g not in used)


# --- what the spec asks for --------------------------------------------------------------


def reward_model_on_generator(spec: JobSpec) -> bool:
    """Does a generator load a model to score with (a reward model or the one-pass feature model)?"""
    return spec.task.reward.kind in ("model", "onepass")


def generator_layout(spec: JobSpec) -> GeneratorLayout:
    gpus = spec.generator.resources.gpus
    if gpus == 0:
        return GeneratorLayout(0, 1, None)
    dedicated = spec.task.reward.device == "dedicated"
    engine_gpus = gpus - (1 if dedicated else 0)
    tp = spec.generator.tensor_parallel_size or engine_gpus
    if spec.generator.engine == "hf":
        tp = 1
    reward = (gpus - 1 if dedicated else 0) if reward_model_on_generator(spec) else None
    return GeneratorLayout(gpus, tp, reward)


def learner_processes(spec: JobSpec) -> int:
    """Learner ranks in all: one per GPU, or `processesPerNode` per node on CPUs (as the operator's pods)."""
    learner = spec.learner
    return learner.nodes * (learner.gpus_per_node or learner.processes_per_node)


def gpus_wanted(spec: JobSpec) -> tuple[int, int]:
    """(GPUs of the learner, GPUs of all the generators)."""
    return spec.learner.nodes * spec.learner.gpus_per_node, spec.generator.replicas * spec.generator.resources.gpus


def check_tensor_parallel(tp: int, heads: int, kv_heads: Optional[int] = None, where: str = "the model") -> None:
    """Refuse a tensor-parallel size vLLM cannot shard the attention of (heads split evenly; KV
    heads split evenly, or replicated when there are fewer of them than GPUs)."""
    kv = kv_heads or heads
    ok = [d for d in range(1, min(heads, 64) + 1) if heads % d == 0 and (kv % d == 0 if d <= kv else d % kv == 0)]
    if tp not in ok:
        raise PlacementError(
            f"generator.tensorParallelSize: {tp} GPUs cannot split {where}'s {heads} attention heads "
            f"({kv} key/value heads) evenly; use one of {ok} (set generator.tensorParallelSize, or "
            "generator.resources.gpus when it is 0)")


# --- the plan ----------------------------------------------------------------------------


def _gpu_error(spec: JobSpec, have: Sequence[str]) -> PlacementError:
    learner, generators = gpus_wanted(spec)
    g, l = spec.generator, spec.learner
    where = f"{len(have)} ({CUDA_VISIBLE_DEVICES}={','.join(have)})" if have else "none"
    fix = ("set generator.resources.gpus and learner.gpusPerNode to 0 to run on CPUs, "
           if not have else "lower generator.replicas, generator.resources.gpus or learner.gpusPerNode, ")
    return PlacementError(
        f"this job needs {learner + generators} GPUs (learner: {l.nodes} node(s) x gpusPerNode {l.gpus_per_node} "
        f"= {learner}; generators: {g.replicas} x resources.gpus {g.resources.gpus} = {generators}) but this "
        f"machine has {where}: {fix}or run it on a cluster (kubectl apply)")


def plan(spec: JobSpec, machine_gpus: Sequence[str], heads: Optional[tuple[int, int]] = None) -> Placement:
    """Every process `asyncrlhf run` would start on a machine with `machine_gpus` (the ids
    CUDA_VISIBLE_DEVICES would name), with its devices and the variables that set them.
    `heads` (attention heads, KV heads), when known, checks the generators' tensor parallelism."""
    machine_gpus = tuple(machine_gpus)
    learner_gpus, generator_gpus = gpus_wanted(spec)
    if learner_gpus + generator_gpus > len(machine_gpus):
        raise _gpu_error(spec, machine_gpus)
    ranks = learner_processes(spec)
    if spec.learner.backend == "torch" and ranks > 1:
        raise PlacementError(
            f"learner.backend 'torch' trains in one process, but this learner has {ranks} "
            f"({spec.learner.nodes} node(s) x {spec.learner.gpus_per_node or spec.learner.processes_per_node}): "
            "set learner.backend to 'deepspeed' (or one node with one GPU/process)")
    layout = generator_layout(spec)
    if heads is not None and layout.gpus:
        check_tensor_parallel(layout.tensor_parallel, *heads, where=spec.model.policy)
    free = list(machine_gpus)
    mine = [free.pop(0) for _ in range(learner_gpus)]
    processes = [_learner(spec, rank, ranks, mine, bool(machine_gpus)) for rank in range(ranks)]
    for i in range(spec.generator.replicas):
        own = [free.pop(0) for _ in range(layout.gpus)]
        processes.append(_generator(spec, i, layout, own, bool(machine_gpus)))
    return Placement(machine_gpus, tuple(processes))


def _visible(gpus: Sequence[str], machine_has_gpus: bool) -> dict[str, str]:
    return {CUDA_VISIBLE_DEVICES: ",".join(gpus)} if machine_has_gpus else {}


def _learner(spec: JobSpec, rank: int, ranks: int, gpus: list[str], machine_has_gpus: bool) -> ProcessPlan:
    on_gpu = spec.learner.gpus_per_node > 0
    env = _visible(gpus, machine_has_gpus)
    if ranks > 1:
        env |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
                "LOCAL_WORLD_SIZE": str(ranks), "DS_ACCELERATOR": "cuda" if on_gpu else "cpu"}
    return ProcessPlan("learner", rank, (gpus[rank],) if on_gpu else (), f"cuda:{rank}" if on_gpu else "cpu",
                       spec.model.dtype, env=env)


def _generator(spec: JobSpec, i: int, layout: GeneratorLayout, gpus: list[str], machine_has_gpus: bool) -> ProcessPlan:
    if not layout.gpus:
        reward = "cpu" if reward_model_on_generator(spec) else ""
        return ProcessPlan("generator", i, (), "cpu", spec.model.dtype, 1, reward, _visible([], machine_has_gpus))
    reward = f"cuda:{layout.reward_gpu}" if layout.reward_gpu is not None else ""
    return ProcessPlan("generator", i, tuple(gpus), "cuda:0", spec.model.dtype, layout.tensor_parallel, reward,
                       _visible(gpus, machine_has_gpus))


def machine_gpus(env: Mapping[str, str], count: int) -> list[str]:
    """The GPU ids this machine offers (`count`: CUDA devices torch sees): those CUDA_VISIBLE_DEVICES
    names, else 0 .. count-1. A GPU named twice (CUDA_VISIBLE_DEVICES=0,0) is shared on purpose by two
    processes (one GPU for a learner and a generator: scripts/gpu-smoke.sh)."""
    if CUDA_VISIBLE_DEVICES in env:
        listed = [g.strip() for g in env[CUDA_VISIBLE_DEVICES].split(",") if g.strip()]
        shared = len(set(listed)) < len(listed)  # torch counts such a list as no device at all
        return listed if count or shared else []
    return [str(i) for i in range(count)]


# --- the rules the workloads apply at start ------------------------------------------------


def _no_cuda(what: str, wanted: int, seen: int) -> PlacementError:
    return PlacementError(
        f"{what} is {wanted} but this process sees {seen} CUDA device(s) (torch.cuda.device_count(); "
        f"a CPU build of torch, no NVIDIA driver or device plugin, or {CUDA_VISIBLE_DEVICES} hiding them): "
        "install the GPU image / a CUDA build of torch, or set it to 0 to run on CPUs")


def learner_device(gpus_per_node: int, local_rank: int, cuda_count: int) -> str:
    """The torch device a learner rank trains on: cuda:LOCAL_RANK when the learner has GPUs."""
    if gpus_per_node == 0:
        return "cpu"
    if cuda_count == 0:
        raise _no_cuda("learner.gpusPerNode", gpus_per_node, 0)
    if local_rank >= cuda_count:
        raise PlacementError(f"learner rank with LOCAL_RANK={local_rank} needs GPU {local_rank} but this process "
                             f"sees {cuda_count} (learner.gpusPerNode is {gpus_per_node}; check "
                             f"{CUDA_VISIBLE_DEVICES} and the pod's nvidia.com/gpu limit)")
    return f"cuda:{local_rank}"


def generator_devices(spec: JobSpec, cuda_count: int) -> tuple[str, str]:
    """(engine device, reward/feature-model device) of a generator process."""
    layout = generator_layout(spec)
    if layout.gpus == 0:
        return "cpu", "cpu"
    if cuda_count < layout.gpus:
        raise _no_cuda("generator.resources.gpus", layout.gpus, cuda_count)
    return "cuda:0", f"cuda:{layout.reward_gpu or 0}"


# --- showing a plan ----------------------------------------------------------------------


def mask_secrets(env: Mapping[str, str]) -> dict[str, str]:
    """The environment with the values of secret-looking variables (passwords, tokens, keys) masked."""
    return {k: (MASK if SECRET_NAME.search(k) and v else v) for k, v in env.items()}


def describe(placement: Placement, envs: Optional[Mapping[str, Mapping[str, str]]] = None) -> list[str]:
    """The plan as lines for people: one block per process (`envs[name]` adds variables to show)."""
    gpus = ",".join(placement.machine_gpus) or "none"
    lines = [f"machine GPUs: {gpus}" + (f" (unused: {','.join(placement.unused)})" if placement.unused else "")]
    for p in placement.processes:
        where = f"GPU {','.join(p.gpus)}" if p.gpus else "CPU"
        extra = f"  tensor_parallel={p.tensor_parallel}" if p.role == "generator" and p.gpus else ""
        extra += f"  reward_model={p.reward_device}" if p.reward_device else ""
        lines.append(f"{p.name}: {where}  device={p.device}  dtype={p.dtype}{extra}")
        for key, value in sorted(mask_secrets(dict(p.env) | dict((envs or {}).get(p.name, {}))).items()):
            lines.append(f"    {key}={value}")
    return lines
