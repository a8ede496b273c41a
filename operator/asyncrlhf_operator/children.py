"""Applying a job's children: the shared handler context, the owner, and the apply paths.

Every path that writes children (create, spec update, the status pass's resync) goes through
`apply_children`, which first asks Kueue's Workload what the job may run (`queueing.admission`),
so no path can start a job that Kueue holds or keep one running that Kueue evicted.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping, Optional

import kopf

from asyncrlhf import api

from . import plan, queueing
from .jetstream import Buses, Credentials, ensure_job_secret, read_credentials
from .kube import Kube, KubeError
from .settings import OperatorConfig


@dataclass
class Context:
    """What the handlers share, kept in kopf's memo."""

    config: OperatorConfig
    kube: Kube = dataclasses.field(default_factory=Kube)
    buses: Buses = dataclasses.field(default_factory=Buses)
    resynced: dict[str, float] = dataclasses.field(default_factory=dict)  # job uid -> monotonic time
    snapshot_failures: dict[str, Optional[str]] = dataclasses.field(default_factory=dict)  # uid -> name warned
    autoscalers: dict[str, Any] = dataclasses.field(default_factory=dict)  # uid -> autoscaling.JobScaler

    def resync_due(self, uid: str) -> bool:
        return time.monotonic() - self.resynced.get(uid, -math.inf) >= self.config.resync_interval

    def mark_resynced(self, uid: str) -> None:
        self.resynced[uid] = time.monotonic()


def owner_of(body: Mapping[str, Any]) -> plan.Owner:
    meta = body["metadata"]
    return plan.Owner(name=meta["name"], namespace=meta.get("namespace") or "default", uid=meta.get("uid", ""))


def previous_status(body: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in dict(body.get("status") or {}).items() if k in api.JobStatus.model_fields
            or k in {f.alias for f in api.JobStatus.model_fields.values()}}


def now() -> datetime:
    return datetime.now(timezone.utc)


async def bus_access(ctx: Context, namespace: str, nats: api.NatsSpec) -> tuple[str, Credentials]:
    """The job's NATS URL and the credentials to use there."""
    url = plan.nats_url(nats, ctx.config.nats_url)
    return url, await read_credentials(ctx.kube, namespace, nats)



async def apply_children(ctx: Context, body, job: api.AsyncRLHFJob, *, kinds: Optional[set[str]] = None,
                         finished: bool = False, admission: Optional[plan.Gate] = None) -> None:
    """Apply the children (only `kinds`, when given), held as Kueue's admission says (read
    here unless the caller has just read it)."""
    owner = owner_of(body)
    if admission is None:  # a finished job has given its quota back: nothing to ask Kueue
        admission = plan.OPEN if finished else \
            (await queueing.admission(ctx.kube, body, job, owner, ctx.config.nats_url)).gate
    for child in plan.desired_children(job, owner, ctx.config.nats_url, finished=finished, admission=admission):
        if kinds is not None and child["kind"] not in kinds:
            continue
        if child["kind"] == "Job":
            await reconcile_learner(ctx, body, job, child, finished=finished)
        elif child["kind"] == "PersistentVolumeClaim":
            await reconcile_volume(ctx, child)
        else:
            await ctx.kube.apply(child)


def searcher_names(body: Optional[Mapping[str, Any]]) -> set[str]:
    """The TBA searcher groups a job body names (`spec.generator.searchers[].name`)."""
    searchers = (((body or {}).get("spec") or {}).get("generator") or {}).get("searchers") or []
    return {str(s["name"]) for s in searchers if isinstance(s, Mapping) and s.get("name")}


async def remove_searchers(kube: Kube, owner: plan.Owner, old, new) -> list[str]:
    """Delete the Deployments of the TBA searchers a spec change dropped (removed or renamed): their
    generators would keep their GPUs, go uncounted, and exit 2 at their next start. From kopf's old
    and new bodies (its last-handled state survives operator restarts), so nothing is listed."""
    gone = sorted(searcher_names(old) - searcher_names(new))
    for name in gone:
        await kube.delete("apps/v1", "Deployment", owner.namespace, f"{plan.Names(owner.name).generator}-{name}")
    return gone


async def reconcile_volume(ctx: Context, desired: dict[str, Any]) -> None:
    """Create the PVC once (its spec is immutable); later only its owner follows retainVolume."""
    meta = desired["metadata"]
    existing = await ctx.kube.get("v1", "PersistentVolumeClaim", meta["namespace"], meta["name"])
    if existing is None:
        await ctx.kube.apply(desired)
        return
    owners = meta.get("ownerReferences", [])
    if (existing.get("metadata") or {}).get("ownerReferences", []) != owners:
        await ctx.kube.merge_patch("v1", "PersistentVolumeClaim", meta["namespace"], meta["name"],
                                   {"metadata": {"ownerReferences": owners or None}})


async def reconcile_learner(ctx: Context, body, job, desired: dict[str, Any], *, finished: bool) -> None:
    """Create the learner Job, or update the mutable part; recreate it when its config changed."""
    meta = desired["metadata"]
    existing = await ctx.kube.get("batch/v1", "Job", meta["namespace"], meta["name"])
    if existing is None:
        if not finished:
            await ctx.kube.apply(desired)
        return
    if finished or (existing.get("metadata") or {}).get("deletionTimestamp"):
        return
    annotations = ((existing.get("spec") or {}).get("template") or {}).get("metadata", {}).get("annotations", {})
    if annotations.get(plan.CONFIG_HASH) != plan.config_hash(job):
        await _replace_learner(ctx, body, meta, "the config changed: restarting the learner from its checkpoint "
                               "with the new config")
        return
    try:
        await ctx.kube.apply(desired)
    except KubeError as err:
        if err.status != 422 or "immutable" not in err.message:
            raise
        # the same config, another pod template: an upgraded operator renders the pods differently
        await _replace_learner(ctx, body, meta, "the operator's learner pod template changed (an operator "
                               "upgrade): restarting the learner from its checkpoint with it")


async def _replace_learner(ctx: Context, body, meta: dict[str, Any], why: str) -> None:
    """A Job's pod template is immutable: delete the Job; the learner resumes from its checkpoint
    in the new one (the timer recreates it once the old one is gone)."""
    await ctx.kube.delete("batch/v1", "Job", meta["namespace"], meta["name"], propagation="Foreground")
    kopf.info(body, reason="LearnerReplaced", message=why)


# ---------------------------------------------------------------------------------------------
# Resource handlers



async def apply_all(ctx: Context, body, job: api.AsyncRLHFJob, *, finished: bool,
                    admission: Optional[plan.Gate] = None) -> None:
    """The job's stream and consumers, then every child; the resync clock starts again."""
    url, credentials = await bus_access(ctx, job.metadata.namespace, job.spec.nats)
    await ctx.buses.ensure(job, url, credentials)
    await ensure_job_secret(ctx.kube, job, owner_of(body))  # before the pods that mount it
    await apply_children(ctx, body, job, finished=finished, admission=admission)
    ctx.mark_resynced(body["metadata"].get("uid", ""))


async def stop_workloads(ctx: Context, owner: plan.Owner, searchers: tuple[str, ...] = ()) -> int:
    """Before a deleted job's bus goes: delete the learner Job and scale the generators to 0 (the
    default Deployment and each TBA searcher's), then count the job's pods still there. A learner
    still running would recreate the stream the finalizer deletes (its stream recovery), leaving it
    orphaned."""
    names = plan.Names(owner.name)
    await ctx.kube.delete("batch/v1", "Job", owner.namespace, names.learner)
    for name in [names.generator] + [f"{names.generator}-{s}" for s in searchers]:
        try:
            await ctx.kube.merge_patch("apps/v1", "Deployment", owner.namespace, name, {"spec": {"replicas": 0}})
        except KubeError as err:
            if err.status != 404:
                raise
    return len(await ctx.kube.list("v1", "Pod", owner.namespace, plan.selector(owner)))


async def generators_status(kube: Kube, owner: plan.Owner, job: api.AsyncRLHFJob,
                            deployment: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The default generator Deployment's status with the TBA searchers' ready replicas added, so
    the Ready condition and the scale status count every generator against generator.replicas."""
    status = dict((deployment or {}).get("status") or {})
    for group in job.spec.generator.groups()[1:]:
        name = f"{plan.Names(owner.name).generator}-{group.name}"
        searcher = await kube.get("apps/v1", "Deployment", owner.namespace, name) or {}
        status["readyReplicas"] = (status.get("readyReplicas") or 0) + \
            ((searcher.get("status") or {}).get("readyReplicas") or 0)
    return status
