"""Kueue gang admission at run time: the job's Workload made, replaced, released and deleted.

What the Workload looks like and what its admission lets run is decided in `plan/kueue.py`;
this module only reads and writes it. Reads are by name (no list, no watch), once per status
pass and once per spec change of a job with a queue name; jobs without one cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import kopf

from asyncrlhf import api

from . import plan
from .kube import Kube, KubeError


@dataclass(frozen=True)
class Admission:
    gate: plan.Gate = plan.OPEN
    workload: Optional[dict[str, Any]] = None  # as read; None when absent, just made or replaced


async def admission(kube: Kube, body, job: api.AsyncRLHFJob, owner: plan.Owner, default_url: str) -> Admission:
    """Make the job's Workload when it has none (replace it when what it reserves changed) and
    say what Kueue lets the job run."""
    if not plan.queue_name(job):
        return Admission()
    name = plan.workload_name(owner)
    existing = await kube.get("kueue.x-k8s.io/v1beta1", "Workload", owner.namespace, name)
    desired = plan.queued_workload(job, owner, default_url)
    action = plan.workload_action(desired, existing)
    if action == "create":
        await kube.apply(desired)
        kopf.info(body, reason="Queued", message=f"Workload {name} queued in LocalQueue {plan.queue_name(job)}: "
                  "learner and generators start together once Kueue admits it")
    elif action == "replace":
        await kube.delete("kueue.x-k8s.io/v1beta1", "Workload", owner.namespace, name)
        kopf.info(body, reason="Requeued", message=f"what the job reserves changed (learner nodes, resources, "
                  f"placement, or more generators than admitted): Workload {name} replaced; the job waits "
                  "for Kueue to admit it again and the learner resumes from its checkpoint")
    if action != "keep":
        return Admission(plan.gate(job, None))
    return Admission(plan.gate(job, existing), existing)


def stopped(learner: Optional[dict[str, Any]], deployment: Optional[dict[str, Any]]) -> bool:
    """No learner pod active and no generator pod left (what Kueue waits for after an eviction)."""
    active = ((learner or {}).get("status") or {}).get("active", 0) or 0
    generators = ((deployment or {}).get("status") or {}).get("replicas", 0) or 0
    return active == 0 and generators == 0


async def release(kube: Kube, owner: plan.Owner, found: Admission, now: str) -> bool:
    """After an eviction, once the job has stopped: clear the Workload's admission so that Kueue
    requeues it. True when it was cleared (a conflict is tried again at the next pass)."""
    patch = plan.release_patch(found.workload or {}, now)
    if patch is None:
        return False
    try:
        await kube.patch_status("kueue.x-k8s.io/v1beta1", "Workload", owner.namespace,
                                plan.workload_name(owner), patch)
    except KubeError as err:
        if err.status in (404, 409):
            return False
        raise
    return True


async def finish(kube: Kube, job: api.AsyncRLHFJob, owner: plan.Owner) -> None:
    """A finished job gives its quota back at once: its Workload is deleted."""
    if plan.queue_name(job):
        await kube.delete("kueue.x-k8s.io/v1beta1", "Workload", owner.namespace, plan.workload_name(owner))
