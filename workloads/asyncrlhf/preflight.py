"""`asyncrlhf validate`: what can be known about a job before it runs, without a network.

The spec models check each field and the cross-field rules (manifest.py). This adds what only
the machine and the files around the manifest can tell: the prompt file and local model paths
exist, a python reward's module is importable from the job file's directory, the reward kind has
the settings it needs, and, for `asyncrlhf run`, the GPUs, cores and memory the job asks for are
on this machine. It also prints the manifest a person should read: the effective values, without
the settings of the reward kinds, prompt sources and devices the job does not use.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any

from .api import AsyncRLHFJob

_SUFFIX = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
           "m": 1e-3}
_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_PROMPTS_BY_SOURCE = {"builtin": {"source", "name"},
                      "file": {"source", "path", "field", "messagesField", "answerField"},
                      "dataset": {"source", "name", "config", "revision", "dataFiles", "split", "field",
                                  "messagesField", "answerField"}}
_REWARD_BY_KIND = {"rule": {"rule"}, "model": {"model", "batchSize", "device"},
                   "python": {"function", "codeConfigMap"}, "http": {"http"},
                   "onepass": {"onepass", "batchSize", "device"}, "sum": {"terms"}}
_TERM_BY_KIND = {"rule": {"rule"}, "model": {"model"}, "python": {"function"}, "http": {"http"}}


def quantity(text: str) -> float:
    """A Kubernetes quantity as a number (cpu: cores, memory: bytes)."""
    match = _QUANTITY.match(str(text))
    if not match or match.group(2) not in _SUFFIX:
        raise ValueError(f"not a quantity: {text!r}")
    return float(match.group(1)) * _SUFFIX[match.group(2)]


def effective_manifest(job: AsyncRLHFJob) -> dict[str, Any]:
    """The manifest with every default filled in, less the settings that do not apply to this job."""
    doc = job.to_manifest()
    spec = doc["spec"]
    task = spec.get("task", {})
    prompts, reward = task.get("prompts", {}), task.get("reward", {})
    _keep(prompts, _PROMPTS_BY_SOURCE.get(prompts.get("source"), set(prompts)))
    kind = reward.get("kind")
    _keep(reward, {"kind", "noEosPenalty"} | _REWARD_BY_KIND.get(kind, set(reward)))
    for term in reward.get("terms", []):
        _keep(term, {"kind", "weight"} | _TERM_BY_KIND.get(term.get("kind"), set(term)))
    generator = spec.get("generator", {})
    if generator.get("resources", {}).get("gpus"):  # GPU settings only on GPUs, the CPU build's only on CPUs
        generator.pop("kvCacheGiB", None)
    else:
        for key in ("memoryFraction", "tensorParallelSize"):
            generator.pop(key, None)
        if generator.get("engine") == "hf":
            generator.pop("kvCacheGiB", None)
    algorithm, asynchrony = spec.get("algorithm", {}), spec.get("async", {})
    if algorithm.get("loss") != "ppo":
        for key in ("gamma", "lam", "vfCoef"):
            algorithm.pop(key, None)
    if asynchrony.get("mode") == "sync":
        asynchrony.pop("maxStaleness", None)
    buffer = job.spec.async_.replay_buffer  # replay.replay_enabled's rule (that module loads torch: validate stays fast)
    if not (buffer.enabled if buffer.enabled is not None else job.spec.algorithm.loss == "tb"):
        asynchrony.pop("replayBuffer", None)
    _off_sections(job, spec)
    return _without_unset(doc)


def _off_sections(job: AsyncRLHFJob, spec: dict[str, Any]) -> None:
    """Sections switched off say only that they are off."""
    model, learner, sync = spec.get("model", {}), spec.get("learner", {}), spec.get("weightSync", {})
    if not job.spec.model.token_secret.name:
        model.pop("tokenSecret", None)
    if not (job.spec.model.cache.claim_name or job.spec.model.cache.size):
        model.pop("cache", None)
    if learner.get("backend") != "deepspeed":
        for key in ("zeroStage", "offload"):
            learner.pop(key, None)
    if not sync.get("volumeSnapshots", {}).get("enabled"):
        sync["volumeSnapshots"] = {"enabled": False}
    if not spec.get("eval", {}).get("everySteps"):
        spec["eval"] = {"everySteps": 0}


def _without_unset(node: Any) -> Any:
    """Empty strings, maps and lists are 'unset' (the default behaviour): not worth a line."""
    if isinstance(node, dict):
        kept = {k: _without_unset(v) for k, v in node.items()}
        return {k: v for k, v in kept.items() if v not in ("", {}, [], None)}
    if isinstance(node, list):
        return [_without_unset(v) for v in node]
    return node


def _keep(section: dict[str, Any], keys: set[str]) -> None:
    for key in [k for k in section if k not in keys]:
        del section[key]


def problems(job: AsyncRLHFJob, manifest: Path) -> tuple[list[str], list[str]]:
    """(what is wrong wherever the job runs, what would fail `asyncrlhf run` on this machine)."""
    errors: list[str] = []
    reward = job.spec.task.reward
    for i, source in enumerate(reward.sources()):
        where = "spec.task.reward" + (f".terms[{i}]" if reward.kind == "sum" else "")
        kind = source.kind if reward.kind == "sum" else reward.kind
        errors += _reward_problems(where, kind, source)
    if reward.kind == "sum" and not reward.terms:
        errors.append("spec.task.reward.terms: kind sum needs at least one term")
    return errors, _local_problems(job, manifest)


def _local_problems(job: AsyncRLHFJob, manifest: Path) -> list[str]:
    """Files the job reads that are not on this machine, GPUs it lacks (a cluster's volumes and
    ConfigMaps may well have the files: these matter for `asyncrlhf run`)."""
    errors: list[str] = []
    spec = job.spec
    reward = spec.task.reward
    for i, source in enumerate(reward.sources()):
        where = "spec.task.reward" + (f".terms[{i}]" if reward.kind == "sum" else "")
        kind = source.kind if reward.kind == "sum" else reward.kind
        if kind == "python" and source.function and not _importable(module := source.function.split(":")[0],
                                                                     manifest.resolve().parent):
            errors.append(f"{where}.function: module {module} is not importable from {manifest.resolve().parent} "
                          "(the job file's directory) or PYTHONPATH")
        if kind == "model" and _looks_local(source.model) and not Path(source.model).exists():
            errors.append(f"{where}.model: {source.model} does not exist on this machine")
    prompts = spec.task.prompts
    if prompts.source == "file" and not Path(prompts.path).is_file():
        errors.append(f"spec.task.prompts.path: {prompts.path} is not a file (paths are relative to the "
                      f"directory you run from: {Path.cwd()})")
    if prompts.source == "dataset" and _looks_local(prompts.name) and not Path(prompts.name).is_dir():
        errors.append(f"spec.task.prompts.name: {prompts.name} is not a directory on this machine")
    for field in ("policy", "reference", "tokenizer"):
        value = getattr(spec.model, field)
        if _looks_local(value) and not Path(value).exists():
            errors.append(f"spec.model.{field}: {value} does not exist on this machine")
    return errors + _placement_problems(job)


def _reward_problems(where: str, kind: str, source) -> list[str]:
    """A reward kind without the setting it needs (the spec's rules may catch these first)."""
    if kind == "python" and not source.function:
        return [f"{where}.function: kind python needs function: 'module:name'"]
    if kind == "http" and not source.http.url:
        return [f"{where}.http.url: kind http needs the reward server's url"]
    if kind == "model" and not source.model:
        return [f"{where}.model: kind model needs a reward model (hub id or path)"]
    return []


def _looks_local(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~"))


def _importable(module: str, directory: Path) -> bool:
    added = str(directory) not in sys.path
    if added:
        sys.path.insert(0, str(directory))
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
    finally:
        if added:
            sys.path.remove(str(directory))


def machine_gpu_count() -> int:
    """NVIDIA GPUs the driver lists (no torch import: validate stays fast)."""
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


def _placement_problems(job: AsyncRLHFJob) -> list[str]:
    from .placement import PlacementError, machine_gpus, plan

    try:
        plan(job.spec, machine_gpus(os.environ, machine_gpu_count()))
    except PlacementError as err:
        return [f"spec (GPUs): {err}"]
    return []


def resource_warnings(job: AsyncRLHFJob) -> list[str]:
    """Requests past this machine: a local run still starts, but the processes compete."""
    import psutil

    from .placement import learner_processes

    spec = job.spec
    pods = [(spec.generator.resources, spec.generator.replicas), (spec.learner.resources, learner_processes(spec))]
    cpus = sum(quantity(r.cpu) * n for r, n in pods)
    memory = sum(quantity(r.memory) * n for r, n in pods)
    warnings = []
    if cpus > (os.cpu_count() or 1):
        warnings.append(f"resources: the processes ask for {cpus:g} CPUs in all; this machine has {os.cpu_count()}")
    if memory > psutil.virtual_memory().total:
        warnings.append(f"resources: the processes ask for {memory / (1 << 30):.1f} GiB of memory in all; "
                        f"this machine has {psutil.virtual_memory().total / (1 << 30):.1f} GiB")
    return warnings
