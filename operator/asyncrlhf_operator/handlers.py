"""Thin kopf handlers: validate, apply what `plan` computes, write what `status` computes.

Handlers are registered on a fresh `kopf.OperatorRegistry` by `build_registry(config)`, so the
operator's settings (default NATS URL, status interval) are plain arguments and tests can run
several operators with different settings in one process.

- create / resume / spec update: validate (invalid → phase Failed, condition SpecInvalid), make
  the JetStream stream, consumers and KV bucket, apply the children. An update that only
  changes generator.replicas applies only the Deployment; one that changes suspend applies
  only the learner Job and the Deployment (`plan.kinds_for`).
- timer: read the children, the KV bucket and (for a job with a Kueue queue name) its Kueue
  Workload, restart a failed learner (up to learner.backoffLimit), write `.status`, post an
  Event on every phase change, start or stop the workloads when Kueue admits or evicts the job
  (queueing.py), apply the generators' scale-down when finished, delete the job after
  ttlSecondsAfterFinished, and let the autoscaler set the generator count (autoscaling.py).
- delete (finalizer): delete the stream and KV bucket, and the PVC unless retained.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from typing import Any, Optional

import kopf

from asyncrlhf import api
from asyncrlhf.bus import JobBus

from . import autoscaling, plan, queueing
from .children import (
    Context, apply_all, apply_children, bus_access, generators_status, now, owner_of, previous_status,
    remove_searchers, stop_workloads,
)
from .jetstream import job_bus
from .kube import KubeError
from .metrics import instrumented, record_phase
from .settings import OperatorConfig, peering_priority
from .health import POD_REASONS, Problem, pod_problem
from .status import (
    TERMINAL, Observed, compute_status, is_finished, learner_action, learner_state, status_patch, timestamp,
    ttl_expired,
)
from .validation import IMMUTABLE_ANNOTATION, deletion_view, recorded_immutables, validate

RESOURCE = (api.GROUP, api.VERSION, api.PLURAL)
PREFIX = api.GROUP
FINALIZER = f"{PREFIX}/cleanup"
# a deleted job's bus goes once its pods are gone: waited for up to this many times this long
FINALIZE_WAITS, FINALIZE_WAIT_SECONDS = 12, 5.0
# kopf's record of the spec whose handlers all completed (its diff base), an annotation on the job
LAST_HANDLED = f"{PREFIX}/last-handled-configuration"

def build_registry(config: OperatorConfig) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        configure(settings, config)
        memo.ctx = Context(config)

    kopf.on.login(registry=registry)(login)
    kopf.on.cleanup(registry=registry)(cleanup)
    kopf.on.resume(*RESOURCE, registry=registry)(reconcile)
    kopf.on.create(*RESOURCE, registry=registry)(reconcile)
    kopf.on.update(*RESOURCE, field="spec", registry=registry)(spec_changed)
    kopf.on.delete(*RESOURCE, registry=registry, retries=FINALIZE_WAITS + 6)(finalize)
    kopf.timer(*RESOURCE, interval=config.status_interval, backoff=2 * config.status_interval,
               registry=registry)(observe)
    return registry


def configure(settings: kopf.OperatorSettings, config: OperatorConfig) -> None:
    settings.peering.standalone = not config.peering
    if config.peering:  # several replicas: the oldest acts, the others wait (settings.peering_priority)
        settings.peering.name, settings.peering.mandatory = config.peering, True
        settings.peering.clusterwide = not config.namespaced
        settings.peering.priority = peering_priority(time.time(), random.SystemRandom().getrandbits(20))
    settings.scanning.disabled = config.namespaced
    settings.persistence.finalizer = FINALIZER
    # Handler progress in annotations: `.status` has a strict schema and is the users' view.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key=LAST_HANDLED.removeprefix(f"{PREFIX}/"))
    settings.watching.server_timeout = 600


# ---------------------------------------------------------------------------------------------
# Activities


async def login(memo: kopf.Memo, **kwargs: Any) -> Optional[kopf.ConnectionInfo]:
    """In-cluster service account or kubeconfig; the same credentials for kopf and `kube`."""
    info = kopf.login_via_client(**kwargs) or kopf.login_with_service_account(**kwargs) \
        or kopf.login_with_kubeconfig(**kwargs)
    if info is not None:
        memo.ctx.kube.use(info)
    return info


async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    await memo.ctx.kube.close()
    await memo.ctx.buses.close()


# ---------------------------------------------------------------------------------------------
# Helpers


def validated(body, patch) -> Optional[api.AsyncRLHFJob]:
    """The job, or None once an invalid one is rejected: phase Failed with a SpecInvalid condition
    naming the field (a Warning event the first time). Every handler validates through here.
    The job's labels come along (the Kueue queue name is one), and its UID."""
    job, error = validate(body)
    if job is None:
        reject(body, patch, error, body["metadata"].get("generation", 0))
        return None
    labels = dict((body["metadata"].get("labels") or {}))
    uid = body["metadata"].get("uid", "")  # recorded in the job's stream and bucket (asyncrlhf.identity)
    return job.model_copy(update={"metadata": job.metadata.model_copy(update={"labels": labels, "uid": uid})})


def reject(body, patch, error: str, generation: int) -> None:
    previous = previous_status(body)
    new = compute_status(Observed(now=now(), generation=generation, spec_error=error,
                                  restarts=previous.get("restarts", 0)), previous)
    patch.status.update(status_patch(previous, new))
    if previous.get("phase") != "Failed":
        kopf.warn(body, reason="SpecInvalid", message=error)


@instrumented("reconcile")
async def reconcile(body, patch, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    ctx: Context = memo.ctx
    job = validated(body, patch)
    if job is None:
        return
    if IMMUTABLE_ANNOTATION not in (body["metadata"].get("annotations") or {}):
        patch.metadata.annotations[IMMUTABLE_ANNOTATION] = recorded_immutables(job)
    await apply_all(ctx, body, job, finished=is_finished(body.get("status") or {}))
    logger.info("applied the children and the bus of %s", job.metadata.name)


@instrumented("update")
async def spec_changed(body, diff, patch, memo: kopf.Memo, logger: logging.Logger, **kwargs: Any) -> None:
    if dropped := await remove_searchers(memo.ctx.kube, owner_of(body), kwargs.get("old"), kwargs.get("new")):
        logger.info("deleted the Deployments of the searchers no longer in the spec: %s", ", ".join(dropped))
    paths = plan.changed_paths(diff)
    kinds = plan.kinds_for(paths)
    if kinds is None:
        await reconcile(body=body, patch=patch, memo=memo, logger=logger, **kwargs)
        return
    job = validated(body, patch)
    if job is None:
        return
    await apply_children(memo.ctx, body, job, kinds=kinds, finished=is_finished(body.get("status") or {}))
    logger.info("applied %s for a change of %s", sorted(kinds), sorted(paths))


@instrumented("delete")
async def finalize(body, memo: kopf.Memo, logger: logging.Logger, retry: int = 0, **_: Any) -> None:
    ctx: Context = memo.ctx
    owner = owner_of(body)
    searchers = ((body.get("spec") or {}).get("generator") or {}).get("searchers") or []
    remaining = await stop_workloads(ctx, owner, tuple(str(s.get("name", "")) for s in searchers if s.get("name")))
    if remaining and retry < FINALIZE_WAITS:  # their stream recovery would bring the stream back
        raise kopf.TemporaryError(f"waiting for {remaining} pods of {owner.name} to stop before deleting "
                                  "its stream", delay=FINALIZE_WAIT_SECONDS)
    nats, sync = deletion_view(body)
    url, credentials = await bus_access(ctx, owner.namespace, nats)
    await ctx.buses.delete(JobBus(owner.namespace, owner.name), url, credentials)
    if not sync.volume_claim and not sync.retain_volume:
        await ctx.kube.delete("v1", "PersistentVolumeClaim", owner.namespace, plan.Names(owner.name).snapshots)
    record_phase(owner.namespace, owner.name, None)
    ctx.resynced.pop(owner.uid, None)
    ctx.snapshot_failures.pop(owner.uid, None)
    ctx.autoscalers.pop(owner.uid, None)
    logger.info("deleted the stream and KV bucket of %s", owner.name)


# ---------------------------------------------------------------------------------------------
# Status


@dataclasses.dataclass(frozen=True)
class Seen:
    """One status pass's reads: what the status is computed from, Kueue's word, the Deployment."""

    observed: Observed
    kueue: queueing.Admission
    deployment: Optional[dict[str, Any]]


async def observe_children(ctx: Context, body, job: api.AsyncRLHFJob) -> Seen:
    owner, names = owner_of(body), plan.Names(job.metadata.name)
    kueue = await queueing.admission(ctx.kube, body, job, owner, ctx.config.nats_url)
    # The bus first, the pods second: progress is written by a learner that was running, so a Job
    # read after it is at least as fresh and the two never show "step 7, learner not started yet".
    url, credentials = await bus_access(ctx, owner.namespace, job.spec.nats)
    try:
        progress, reports = await ctx.buses.progress(job_bus(job), url, credentials)
    except kopf.TemporaryError:
        progress, reports = None, ()  # the bus is away: keep the last known progress
    learner = await ctx.kube.get("batch/v1", "Job", owner.namespace, names.learner)
    deployment = await ctx.kube.get("apps/v1", "Deployment", owner.namespace, names.generator)
    o = Observed(
        now=now(), generation=body["metadata"].get("generation", 0), spec=job.spec, learner=learner,
        generators=await generators_status(ctx.kube, owner, job, deployment), progress=progress, reports=reports,
        restarts=previous_status(body).get("restarts", 0),
        generator_selector=",".join(f"{k}={v}" for k, v in plan.selector(owner, "generator").items()),
        hold_reason=kueue.gate.reason, hold_message=kueue.gate.message,
    )
    if all_ready(o):
        return Seen(o, kueue, deployment)
    # Something is not up: read the pods to say why (only then), and the volumes when a pod
    # cannot be scheduled (an unbound PVC is one reason why)
    pods = await ctx.kube.list("v1", "Pod", owner.namespace, plan.selector(owner))
    claims = []
    if (pod_problem(pods) or Problem("", "")).reason == "Unschedulable":
        claims = [c for c in [await ctx.kube.get("v1", "PersistentVolumeClaim", owner.namespace, name)
                              for name in plan.claim_names(job, owner)] if c is not None]
    return Seen(dataclasses.replace(o, pods=tuple(pods), claims=tuple(claims)), kueue, deployment)


def all_ready(o: Observed) -> bool:
    """Learner running and every generator ready (or none wanted: suspended, held by Kueue)."""
    if o.spec is None or o.spec.suspend or o.hold_reason:
        return True
    ready = (o.generators or {}).get("readyReplicas", 0) or 0
    return learner_state(o.learner, o.spec.learner.nodes) in ("running", "succeeded") \
        and ready >= o.spec.generator.replicas


async def restart_learner(ctx: Context, body, o: Observed) -> Observed:
    owner = owner_of(body)
    await ctx.kube.delete("batch/v1", "Job", owner.namespace, plan.Names(owner.name).learner,
                          propagation="Foreground")
    kopf.warn(body, reason="LearnerRestarting",
              message=f"the learner failed; restarting it from its checkpoint "
              f"(restart {o.restarts + 1} of {o.spec.learner.backoff_limit})")
    return dataclasses.replace(o, restarts=o.restarts + 1, learner=None)


def post_problem(body, before: dict[str, Any], after: dict[str, Any]) -> None:
    """A Warning Event when pods start failing for a new reason (the Ready condition's)."""
    def ready_reason(status: dict[str, Any]) -> str:
        return next((c.get("reason", "") for c in status.get("conditions") or [] if c["type"] == "Ready"), "")

    reason = ready_reason(after)
    if reason != ready_reason(before) and (reason in POD_REASONS or reason.startswith("Volume")):
        message = next(c["message"] for c in after["conditions"] if c["type"] == "Ready")
        kopf.warn(body, reason=reason, message=message)


def post_transition(body, before: str, after: dict[str, Any]) -> None:
    phase = after["phase"]
    if phase == before:
        return
    condition = next((c for c in after["conditions"] if c["type"] == "Progressing"), {})
    if phase == "Failed":
        failed = next((c for c in after["conditions"] if c["type"] == "Failed"), {})
        kopf.warn(body, reason=failed.get("reason", "Failed"), message=failed.get("message", ""))
    else:
        kopf.info(body, reason=phase, message=condition.get("message") or f"phase {phase}")


@instrumented("status")
async def observe(body, patch, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    ctx: Context = memo.ctx
    if FINALIZER not in (body["metadata"].get("finalizers") or []):
        return  # kopf is still taking the job in; writing status now would only race with it
    if body["metadata"].get("deletionTimestamp"):
        return  # being deleted: the finalizer stops the workloads; converging would start them again
    previous = previous_status(body)
    job = validated(body, patch)
    if job is None:
        owner = owner_of(body)
        record_phase(owner.namespace, owner.name, "Failed")
        return
    if is_finished(previous):
        await wind_down(ctx, body, job, previous)
        return
    seen = await observe_children(ctx, body, job)
    o = seen.observed
    if learner_action(o, previous.get("phase", "")) == "restart":
        o = await restart_learner(ctx, body, o)
    new = compute_status(o, previous)
    if o.progress is not None and (job.spec.weight_sync.volume_snapshots.enabled or previous.get("volumeSnapshots")):
        new["volumeSnapshots"] = await take_volume_snapshots(ctx, body, job, o.progress.step,
                                                             previous.get("volumeSnapshots", []))
    scaled = await autoscaling.autoscale(ctx, body, job, o, seen.kueue.gate, new)  # may set new["autoscale"]
    patch.status.update(status_patch(previous, new))
    post_transition(body, previous.get("phase", ""), new)
    post_problem(body, previous, new)
    record_phase(job.metadata.namespace, job.metadata.name, new["phase"])
    if new["phase"] in TERMINAL:
        await queueing.finish(ctx.kube, job, owner_of(body))  # the quota goes back at once
        return
    await converge(ctx, body, scaled or job, dataclasses.replace(seen, observed=o))


async def converge(ctx: Context, body, job: api.AsyncRLHFJob, seen: Seen) -> None:
    """Children back after a resync, the learner at once after a restart, the workloads started
    or stopped as soon as Kueue's admission changes; after an eviction, once they have stopped,
    the admission cleared so that Kueue requeues the job."""
    o, gate = seen.observed, seen.kueue.gate
    if ctx.resync_due(body["metadata"].get("uid", "")):  # children (and the stream) deleted or edited by hand
        await apply_all(ctx, body, job, finished=False, admission=gate)
    elif o.learner is None:  # restarted, replaced or deleted by hand: at once, not at the next resync
        await apply_children(ctx, body, job, kinds={"Job"}, admission=gate)
    elif out_of_step(job, gate, o.learner, seen.deployment):
        await apply_children(ctx, body, job, kinds={"Job", "Deployment"}, admission=gate)
    if gate.reason == "Evicted" and queueing.stopped(o.learner, seen.deployment) \
            and await queueing.release(ctx.kube, owner_of(body), seen.kueue, timestamp(o.now)):
        kopf.info(body, reason="AdmissionReleased", message="learner and generators stopped after the eviction: "
                  "Kueue may requeue the job")


def out_of_step(job: api.AsyncRLHFJob, gate: plan.Gate, learner, deployment) -> bool:
    """The learner's suspension or the generator count differs from what the spec and Kueue say."""
    suspend = job.spec.suspend or not gate.admitted
    replicas = plan.generator_replicas(job, allowed=gate.generators if gate.admitted else 0)
    return bool(((learner or {}).get("spec") or {}).get("suspend", False)) != suspend or \
        (deployment is not None and (deployment.get("spec") or {}).get("replicas") != replicas)


async def take_volume_snapshots(ctx: Context, body, job: api.AsyncRLHFJob, step: int, taken: list[str]) -> list[str]:
    """A VolumeSnapshot of the volume at each multiple of volumeSnapshots.everySteps; the oldest
    beyond `keep` deleted. Returns what .status.volumeSnapshots lists afterwards."""
    take, drop, kept = plan.volume_snapshot_plan(job, step, taken)
    owner = owner_of(body)
    try:
        if take:
            await ctx.kube.apply(plan.volume_snapshot(job, owner, take))
            kopf.info(body, reason="VolumeSnapshotTaken", message=f"VolumeSnapshot {take} of the volume at step {step}")
        for name in drop:
            await ctx.kube.delete("snapshot.storage.k8s.io/v1", "VolumeSnapshot", owner.namespace, name)
    except KubeError as err:
        # e.g. no VolumeSnapshot CRD (no CSI snapshot controller): say so once per snapshot, keep
        # the status going, and try again at the next pass
        if ctx.snapshot_failures.get(owner.uid) != take:
            ctx.snapshot_failures[owner.uid] = take
            kopf.warn(body, reason="VolumeSnapshotFailed", message=f"cannot take VolumeSnapshot {take}: {err} "
                      "(is a CSI snapshot controller with the snapshot.storage.k8s.io CRDs installed?)")
        return list(taken)
    ctx.snapshot_failures.pop(owner.uid, None)
    return kept


async def wind_down(ctx: Context, body, job: api.AsyncRLHFJob, status: dict[str, Any]) -> None:
    """A finished job: stop the generators once, delete the job when its TTL has passed."""
    record_phase(job.metadata.namespace, job.metadata.name, status["phase"])
    owner = owner_of(body)
    deployment = await ctx.kube.get("apps/v1", "Deployment", owner.namespace, plan.Names(owner.name).generator)
    if deployment is not None and (deployment.get("spec") or {}).get("replicas", 0):
        await apply_children(ctx, body, job, kinds={"Deployment"}, finished=True)
    if ttl_expired(job.spec, status, now()):
        kopf.info(body, reason="Expired", message=f"deleting the job {job.spec.ttl_seconds_after_finished}s "
                  "after it finished (ttlSecondsAfterFinished)")
        await ctx.kube.delete(api.API_VERSION, api.KIND, owner.namespace, owner.name)
