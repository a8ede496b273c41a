"""The snapshot volume (PVC) and its CSI VolumeSnapshots.

A retained volume (weightSync.retainVolume, the default) and its VolumeSnapshots have no owner:
garbage collection would otherwise delete them with the job, and they hold its checkpoints.
"""

from __future__ import annotations

from typing import Any, Optional

from asyncrlhf import api

from .meta import Names, Owner, metadata


def snapshot_claim_name(job: api.AsyncRLHFJob, owner: Owner) -> str:
    return job.spec.weight_sync.volume_claim or Names(owner.name).snapshots


def model_cache_claim_name(job: api.AsyncRLHFJob, owner: Owner) -> str:
    """The PVC mounted at /cache, or "" for an emptyDir."""
    cache = job.spec.model.cache
    return cache.claim_name or (Names(owner.name).model_cache if cache.size else "")


def model_cache_pvc(job: api.AsyncRLHFJob, owner: Owner) -> Optional[dict[str, Any]]:
    """The model cache PVC to create (owned: deleted with the job), or None."""
    cache = job.spec.model.cache
    if cache.claim_name or not cache.size:
        return None
    spec: dict[str, Any] = {"accessModes": [cache.access_mode], "resources": {"requests": {"storage": cache.size}}}
    if cache.storage_class:
        spec["storageClassName"] = cache.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": metadata(owner, Names(owner.name).model_cache, "model-cache"), "spec": spec}


def claim_names(job: api.AsyncRLHFJob, owner: Owner) -> list[str]:
    """Every PVC the job's pods mount."""
    return [name for name in (snapshot_claim_name(job, owner), model_cache_claim_name(job, owner)) if name]


def snapshot_pvc(job: api.AsyncRLHFJob, owner: Owner) -> Optional[dict[str, Any]]:
    """The PVC to create, or None when the spec names an existing claim."""
    sync = job.spec.weight_sync
    if sync.volume_claim:
        return None
    spec: dict[str, Any] = {
        "accessModes": [sync.access_mode],
        "resources": {"requests": {"storage": sync.size}},
    }
    if sync.storage_class:
        spec["storageClassName"] = sync.storage_class
    meta = metadata(owner, Names(owner.name).snapshots, "snapshots", owned=not sync.retain_volume)
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}


def volume_snapshot(job: api.AsyncRLHFJob, owner: Owner, name: str) -> dict[str, Any]:
    """A CSI VolumeSnapshot of the job's volume. The checkpoints on it are crash-consistent (each
    is renamed into place, then LATEST is replaced), so any snapshot restores to a resumable one."""
    settings = job.spec.weight_sync.volume_snapshots
    spec: dict[str, Any] = {"source": {"persistentVolumeClaimName": snapshot_claim_name(job, owner)}}
    if settings.class_name:
        spec["volumeSnapshotClassName"] = settings.class_name
    meta = metadata(owner, name, "backup", owned=not job.spec.weight_sync.retain_volume)
    return {"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot", "metadata": meta, "spec": spec}


def volume_snapshot_plan(job: api.AsyncRLHFJob, step: int, taken: list[str]) -> tuple[Optional[str], list[str], list[str]]:
    """(the VolumeSnapshot to take now or None, those to delete, the names kept afterwards, oldest
    first) once the learner is at `step`, given `taken` (from .status). One per multiple of
    everySteps, named after it, so a repeated pass takes nothing twice."""
    settings = job.spec.weight_sync.volume_snapshots
    if not settings.enabled or step < settings.every_steps:
        return None, [], list(taken)
    due = f"{job.metadata.name}-step-{step // settings.every_steps * settings.every_steps}"
    new = None if due in taken else due
    names = list(taken) + ([new] if new else [])
    return new, names[: -settings.keep], names[-settings.keep:]
