"""Kueue gang admission: the job's Workload, and what Kueue lets the job run (pure functions).

A job labelled `kueue.x-k8s.io/queue-name: Q` is admitted as one gang. The operator makes one
Kueue `Workload` (kueue.x-k8s.io/v1beta1) named `asyncrlhfjob-<job>` with two pod sets, `learner`
(learner.nodes pods) and `generator` (generator.replicas pods), each with the pod template the
operator runs, so Kueue reserves quota for generators and learner together or not at all. Until
the Workload is admitted the learner Job stays suspended and the generators at zero; `spec.suspend`
stays the user's and is never written.

- Admitted (`status.admission` set, condition `Admitted` True, `Evicted` not True): the learner
  runs, and min(generator.replicas, the admitted generator count) generators.
- Evicted (preempted, deactivated, a failed admission check...): both stop; once no learner pod
  is active and no generator is left, the operator clears the admission (QuotaReserved False,
  reason Pending, the `Requeued` condition), as Kueue's own job controllers do, and Kueue
  requeues the Workload. The learner resumes from its checkpoint when it is admitted again.
- Pod sets cannot change (Kueue's rule). A change that alters what is reserved (learner nodes,
  resources, nodeSelector, tolerations, affinity, priorityClassName) or more generators than were
  admitted replaces the Workload: the job is suspended and queued again, as Kueue does for a
  batch Job whose pod sets change. Fewer generators than admitted run at once, no requeue.
- Finished: the Workload is deleted, so the quota is released at once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal, Optional

from asyncrlhf import api

from .meta import Owner, metadata
from .pods import generator_deployment, learner_job

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_API = "kueue.x-k8s.io/v1beta1"
WORKLOAD = "Workload"
LEARNER_SET, GENERATOR_SET = "learner", "generator"
SHAPE = f"{api.GROUP}/reserved-hash"  # annotation: the hash of what the Workload reserves
# Pod fields that decide what quota (and which flavor) a pod set takes; other template changes
# (env, the config hash) restart the learner but do not requeue the job.
RESERVED_POD_FIELDS = ("nodeSelector", "tolerations", "affinity", "priorityClassName", "runtimeClassName")

Action = Literal["keep", "create", "replace", "wait"]


@dataclass(frozen=True)
class Gate:
    """What Kueue lets the job run now."""

    managed: bool = False  # the job is queued through Kueue
    admitted: bool = True
    generators: Optional[int] = None  # the admitted generator count (None: no limit)
    reason: str = ""  # why it is held: WaitingForAdmission, Evicted
    message: str = ""

    def replicas(self, wanted: int) -> int:
        if not self.admitted:
            return 0
        return wanted if self.generators is None else min(wanted, self.generators)


OPEN = Gate()


def queue_name(job: api.AsyncRLHFJob) -> str:
    return job.metadata.labels.get(QUEUE_LABEL, "")


def workload_name(owner: Owner) -> str:
    return f"asyncrlhfjob-{owner.name}"  # Kueue's own pattern: <kind>-<name>


def queued_workload(job: api.AsyncRLHFJob, owner: Owner, default_url: str) -> dict[str, Any]:
    """The Workload of a job with a queue name: both pod sets at their full, unsuspended size."""
    running = job.model_copy(update={"spec": job.spec.model_copy(update={"suspend": False})})
    learner = learner_job(running, owner, default_url)["spec"]["template"]
    generator = generator_deployment(running, owner, default_url)["spec"]["template"]
    pod_sets = [
        {"name": LEARNER_SET, "count": job.spec.learner.nodes, "template": learner},
        {"name": GENERATOR_SET, "count": job.spec.generator.replicas, "template": generator},
    ]
    meta = metadata(owner, workload_name(owner), "workload")
    meta["annotations"] = {SHAPE: reserved_hash(pod_sets)}
    return {"apiVersion": KUEUE_API, "kind": WORKLOAD, "metadata": meta,
            "spec": {"queueName": queue_name(job), "podSets": pod_sets}}


def reserved_hash(pod_sets: list[dict[str, Any]]) -> str:
    """What the pod sets reserve, generator count left out (fewer generators never requeue)."""
    def reserved(pod_set: dict[str, Any]) -> dict[str, Any]:
        spec = pod_set["template"]["spec"]
        return {
            "name": pod_set["name"],
            "count": pod_set["count"] if pod_set["name"] != GENERATOR_SET else None,
            "containers": [(c["name"], c.get("resources")) for c in spec.get("containers", [])],
            **{key: spec.get(key) for key in RESERVED_POD_FIELDS},
        }
    text = json.dumps([reserved(p) for p in pod_sets], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _conditions(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c.get("type", ""): c for c in (workload.get("status") or {}).get("conditions") or []}


def _true(workload: dict[str, Any], kind: str) -> Optional[dict[str, Any]]:
    condition = _conditions(workload).get(kind)
    return condition if condition and condition.get("status") == "True" else None


def is_admitted(workload: dict[str, Any]) -> bool:
    return bool((workload.get("status") or {}).get("admission")) and _true(workload, "Admitted") is not None \
        and _true(workload, "Evicted") is None


def admitted_count(workload: dict[str, Any], name: str) -> int:
    """Pods of a pod set the admission covers (its count, else the pod set's as created)."""
    for assignment in ((workload.get("status") or {}).get("admission") or {}).get("podSetAssignments") or []:
        if assignment.get("name") == name and assignment.get("count") is not None:
            return int(assignment["count"])
    return next((int(p.get("count", 0)) for p in (workload.get("spec") or {}).get("podSets") or []
                 if p.get("name") == name), 0)


def workload_action(desired: dict[str, Any], existing: Optional[dict[str, Any]]) -> Action:
    """Create the Workload, keep it, replace it (delete now, create at the next pass), or wait
    for a deletion to finish."""
    if existing is None:
        return "create"
    if (existing.get("metadata") or {}).get("deletionTimestamp"):
        return "wait"
    shape = ((existing.get("metadata") or {}).get("annotations") or {}).get(SHAPE)
    if shape != desired["metadata"]["annotations"][SHAPE]:
        return "replace"
    wanted = next(p["count"] for p in desired["spec"]["podSets"] if p["name"] == GENERATOR_SET)
    if (existing.get("status") or {}).get("admission"):
        return "replace" if wanted > admitted_count(existing, GENERATOR_SET) else "keep"
    return "keep" if wanted == admitted_count(existing, GENERATOR_SET) else "replace"


def gate(job: api.AsyncRLHFJob, workload: Optional[dict[str, Any]]) -> Gate:
    """What the Workload (None: not there yet) lets the job run."""
    queue = queue_name(job)
    if not queue:
        return OPEN
    if workload is None:
        return Gate(True, False, reason="WaitingForAdmission",
                    message=f"queued in LocalQueue {queue}: creating its Kueue Workload")
    name = (workload.get("metadata") or {}).get("name", "")
    evicted = _true(workload, "Evicted")
    if evicted:
        return Gate(True, False, reason="Evicted", message=(
            f"Kueue evicted Workload {name} ({evicted.get('reason', '')}: {evicted.get('message', '')}); "
            "learner and generators stopped, the learner resumes from its checkpoint once it is admitted again"))
    if is_admitted(workload):
        return Gate(True, True, generators=admitted_count(workload, GENERATOR_SET))
    waiting = _conditions(workload).get("QuotaReserved") or {}
    detail = f": {waiting['message']}" if waiting.get("message") else ""
    return Gate(True, False, reason="WaitingForAdmission",
                message=f"waiting for Kueue to admit Workload {name} in LocalQueue {queue}{detail}")


def release_patch(workload: dict[str, Any], now: str) -> Optional[dict[str, Any]]:
    """After an eviction, once the job has stopped: the status merge patch that clears the
    admission (what Kueue's job controllers write), or None when there is none to clear. The
    resourceVersion makes it conditional: a Workload changed meanwhile is read again next pass."""
    evicted = _true(workload, "Evicted")
    status = workload.get("status") or {}
    if evicted is None or not (status.get("admission") or _true(workload, "QuotaReserved")):
        return None
    reason, message = evicted.get("reason", ""), evicted.get("message", "")
    generation = (workload.get("metadata") or {}).get("generation", 0)
    updates = {
        "QuotaReserved": ("False", "Pending", message),
        "Admitted": ("False", "NoReservation", "The workload has no reservation"),
        # Kueue requeues at once after a preemption or a failed admission check
        "Requeued": ("True" if reason in ("Preempted", "AdmissionCheck") else "False", reason, message),
    }
    conditions = [c for c in status.get("conditions") or [] if c.get("type") not in updates]
    for kind, (value, why, text) in updates.items():
        old = _conditions(workload).get(kind) or {}
        moved = old.get("status") != value
        conditions.append({"type": kind, "status": value, "reason": why, "message": text,
                           "observedGeneration": generation,
                           "lastTransitionTime": now if moved else old.get("lastTransitionTime", now)})
    return {"metadata": {"resourceVersion": (workload.get("metadata") or {}).get("resourceVersion")},
            "status": {"admission": None, "conditions": conditions}}
