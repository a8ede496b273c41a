"""Kueue gang admission, the pure part (asyncrlhf_operator/plan/kueue.py): the Workload a job with a
queue name gets, checked against Kueue's own v1beta1 schema and the official pod schema; what
its admission lets run; when it is replaced; the status that releases it after an eviction.
The operator doing it against an API server is in tests/test_operator_kmock.py."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

import jsonschema
import kubernetes_validate
import pytest

from asyncrlhf import api
from asyncrlhf_operator import plan

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "tests" / "data" / "kueue-workload-v1beta1.schema.json").read_text())
NATS = "nats://nats.asyncrlhf-system.svc:4222"
OWNER = plan.Owner(name="demo", namespace="team", uid="0b8c4a4e-6b9e-4c55-9d5e-1f0c3a9b7d21")
NOW = "2026-03-01T12:00:00Z"


def job(queue: Optional[str] = "gpu-queue", **spec: Any) -> api.AsyncRLHFJob:
    labels = {plan.QUEUE_LABEL: queue} if queue else {}
    return api.AsyncRLHFJob.model_validate(
        {"metadata": {"name": OWNER.name, "namespace": OWNER.namespace, "labels": labels}, "spec": spec})


def workload(j: api.AsyncRLHFJob) -> dict[str, Any]:
    return plan.queued_workload(j, OWNER, NATS)


def condition(kind: str, status: str = "True", reason: str = "Reason", message: str = "") -> dict[str, Any]:
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2026-03-01T11:00:00Z"}


def admitted(wl: dict[str, Any], generators: Optional[int] = None, *extra: dict[str, Any]) -> dict[str, Any]:
    """The Workload as Kueue leaves it once it admitted it (generators: the generator pod set's count)."""
    wl = copy.deepcopy(wl)
    wl["metadata"].update(resourceVersion="41", generation=1)
    counts = {p["name"]: p["count"] for p in wl["spec"]["podSets"]}
    if generators is not None:
        counts[plan.kueue.GENERATOR_SET] = generators
    wl["status"] = {
        "admission": {"clusterQueue": "cluster-gpus", "podSetAssignments": [
            {"name": name, "count": count, "flavors": {"cpu": "default", "memory": "default"}}
            for name, count in counts.items()]},
        "conditions": [condition("QuotaReserved"), condition("Admitted"), *extra],
    }
    return wl


def schema_errors(obj: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    return [f"/{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


# --- the Workload ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [
    {},
    {"learner": {"nodes": 4, "gpusPerNode": 8, "backend": "deepspeed", "zeroStage": 3},
     "generator": {"replicas": 8, "resources": {"gpus": 1, "memory": "80Gi"}}},
    {"generator": {"replicas": 0}},
    {"suspend": True},
], ids=["defaults", "multi-node-gpu", "no-generators", "suspended"])
def test_the_workload_is_valid_for_kueue_and_its_pods_for_kubernetes(spec):
    j = job(**spec)
    wl = workload(j)
    assert schema_errors(wl) == []
    for pod_set in wl["spec"]["podSets"]:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", **pod_set["template"]["metadata"]},
               "spec": pod_set["template"]["spec"]}
        kubernetes_validate.validate(pod, "1.35", strict=True)
    assert schema_errors({**wl, "spec": {**wl["spec"], "podSets": []}})  # the check is not vacuous


def test_the_workload_is_the_gang_the_job_runs():
    j = job(learner={"nodes": 2}, generator={"replicas": 3}, suspend=True)
    wl = workload(j)
    children = {c["kind"]: c for c in plan.desired_children(j, OWNER, NATS)}
    assert wl["apiVersion"] == "kueue.x-k8s.io/v1beta1" and wl["kind"] == "Workload"
    assert wl["metadata"]["name"] == "asyncrlhfjob-demo" and wl["metadata"]["namespace"] == "team"
    assert wl["metadata"]["ownerReferences"] == [plan.owner_reference(OWNER)]  # deleted with the job
    assert "finalizers" not in wl["metadata"]  # no finalizer: a replaced Workload goes at once
    assert wl["spec"]["queueName"] == "gpu-queue"
    learner, generator = wl["spec"]["podSets"]
    assert (learner["name"], learner["count"], generator["name"], generator["count"]) == ("learner", 2, "generator", 3)
    # exactly the pods that run: what Kueue reserves is what the scheduler gets asked for
    assert learner["template"] == children["Job"]["spec"]["template"]
    assert generator["template"] == children["Deployment"]["spec"]["template"]
    # the queue label stays on the job: children carry none, so Kueue's Job integration ignores them
    for child in children.values():
        assert plan.QUEUE_LABEL not in (child["metadata"].get("labels") or {})


def test_a_job_without_a_queue_name_is_never_held():
    assert plan.gate(job(queue=None), None) == plan.OPEN
    children = {c["kind"]: c for c in plan.desired_children(job(queue=None, generator={"replicas": 2}), OWNER, NATS)}
    assert children["Job"]["spec"]["suspend"] is False and children["Deployment"]["spec"]["replicas"] == 2


# --- what the admission lets run --------------------------------------------------------------------


EVICTED = condition("Evicted", reason="Preempted", message="Preempted to accommodate a higher priority Workload")
GATES = [
    # (name, the Workload as read, admitted, generators allowed, reason)
    ("absent", None, False, 0, "WaitingForAdmission"),
    ("queued", lambda wl: {**wl, "status": {"conditions": [
        condition("QuotaReserved", "False", "Pending", "couldn't assign flavors to pod set learner: "
                  "insufficient quota for nvidia.com/gpu")]}}, False, 0, "WaitingForAdmission"),
    ("quota-reserved-but-checks-pending", lambda wl: {**admitted(wl), "status": {
        **admitted(wl)["status"], "conditions": [condition("QuotaReserved"), condition("Admitted", "False")]}},
     False, 0, "WaitingForAdmission"),
    ("admitted", lambda wl: admitted(wl), True, 3, ""),
    ("admitted-fewer-generators", lambda wl: admitted(wl, 2), True, 2, ""),
    ("evicted-still-reserved", lambda wl: admitted(wl, None, EVICTED), False, 0, "Evicted"),
    ("evicted-released", lambda wl: {**wl, "status": {"conditions": [
        EVICTED, condition("QuotaReserved", "False", "Pending")]}}, False, 0, "Evicted"),
    ("readmitted", lambda wl: admitted(wl, None, condition("Evicted", "False", "QuotaReserved")), True, 3, ""),
]


@pytest.mark.parametrize("name, make, runs, generators, reason", GATES, ids=[g[0] for g in GATES])
def test_what_the_admission_lets_run(name, make, runs, generators, reason):
    j = job(generator={"replicas": 3})
    read = make(workload(j)) if make else None
    gate = plan.gate(j, read)
    assert (gate.admitted, gate.replicas(3), gate.reason) == (runs, generators, reason)
    children = {c["kind"]: c for c in plan.desired_children(j, OWNER, NATS, admission=gate)}
    assert children["Job"]["spec"]["suspend"] is (not runs)
    assert children["Deployment"]["spec"]["replicas"] == generators
    if name == "queued":  # Kueue's reason is passed on
        assert "insufficient quota for nvidia.com/gpu" in gate.message and "gpu-queue" in gate.message
    if reason == "Evicted":
        assert "Preempted" in gate.message and "checkpoint" in gate.message


def test_a_suspended_job_stays_suspended_whatever_kueue_says():
    j = job(suspend=True, generator={"replicas": 3})
    gate = plan.gate(j, admitted(workload(j)))
    children = {c["kind"]: c for c in plan.desired_children(j, OWNER, NATS, admission=gate)}
    assert children["Job"]["spec"]["suspend"] is True and children["Deployment"]["spec"]["replicas"] == 0


# --- when the Workload is replaced ------------------------------------------------------------------------


def reshaped(**spec: Any) -> dict[str, Any]:
    return workload(job(**{"generator": {"replicas": 3}, **spec}))


ACTIONS = [
    # (name, existing: admitted?, desired change, action)
    ("same", True, {}, "keep"),
    ("fewer-generators-admitted", True, {"generator": {"replicas": 1}}, "keep"),
    ("more-generators-than-admitted", True, {"generator": {"replicas": 5}}, "replace"),
    ("more-learner-nodes", True, {"learner": {"nodes": 2}}, "replace"),
    ("more-memory", True, {"generator": {"replicas": 3, "resources": {"memory": "64Gi"}}}, "replace"),
    ("node-selector", True, {"learner": {"podTemplate": {"spec": {"nodeSelector": {"pool": "h100"}}}}}, "replace"),
    ("a-config-change-restarts-the-learner-but-does-not-requeue", True, {"learner": {"totalSteps": 5000}}, "keep"),
    ("queued-other-generator-count", False, {"generator": {"replicas": 1}}, "replace"),
    ("queued-same", False, {}, "keep"),
]


@pytest.mark.parametrize("name, is_admitted, change, action", ACTIONS, ids=[a[0] for a in ACTIONS])
def test_when_the_workload_is_replaced(name, is_admitted, change, action):
    existing = reshaped()
    if is_admitted:
        existing = admitted(existing)
    assert plan.workload_action(reshaped(**change), existing) == action


def test_a_workload_being_deleted_is_waited_for_and_an_absent_one_made():
    existing = reshaped()
    existing["metadata"]["deletionTimestamp"] = NOW
    assert plan.workload_action(reshaped(), existing) == "wait"
    assert plan.workload_action(reshaped(), None) == "create"


# --- after an eviction ----------------------------------------------------------------------------


@pytest.mark.parametrize("reason, requeued", [("Preempted", "True"), ("InactiveWorkload", "False")])
def test_an_eviction_is_released_as_kueues_job_controllers_do(reason, requeued):
    evicted = admitted(reshaped(), None, condition("Evicted", reason=reason, message="why"))
    patch = plan.release_patch(evicted, NOW)
    assert patch["metadata"] == {"resourceVersion": "41"}  # conditional: a changed Workload is read again
    assert patch["status"]["admission"] is None
    after = copy.deepcopy(evicted)
    after["status"] = {**after["status"], **patch["status"]}
    del after["status"]["admission"]
    assert schema_errors(after) == []
    conditions = {c["type"]: c for c in after["status"]["conditions"]}
    assert (conditions["QuotaReserved"]["status"], conditions["QuotaReserved"]["reason"]) == ("False", "Pending")
    assert conditions["Admitted"]["status"] == "False"
    assert (conditions["Requeued"]["status"], conditions["Requeued"]["reason"]) == (requeued, reason)
    assert conditions["Evicted"]["status"] == "True"  # Kueue's own, kept
    assert conditions["QuotaReserved"]["lastTransitionTime"] == NOW
    assert plan.gate(job(generator={"replicas": 3}), after).reason == "Evicted"  # still held
    assert plan.release_patch(after, NOW) is None  # nothing left to release


def test_nothing_is_released_without_an_eviction():
    assert plan.release_patch(admitted(reshaped()), NOW) is None
    assert plan.release_patch(reshaped(), NOW) is None


# --- the job's status while Kueue holds it -----------------------------------------------------------


def test_a_held_job_is_suspended_with_kueues_reason_and_a_wait_is_not_a_stall():
    from datetime import datetime, timezone

    from asyncrlhf.messages import LearnerProgress
    from asyncrlhf_operator.status import Observed, compute_status

    now = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
    j = job(progressDeadlineSeconds=600, failOnStall=True)
    gate = plan.gate(j, None)
    held = compute_status(Observed(now=now, spec=j.spec, hold_reason=gate.reason, hold_message=gate.message), {
        "phase": "Running", "step": 7, "lastProgressTime": "2026-03-01T09:00:00Z"})
    conditions = {c["type"]: c for c in held["conditions"]}
    assert held["phase"] == "Suspended"
    assert (conditions["Suspended"]["status"], conditions["Suspended"]["reason"]) == ("True", "WaitingForAdmission")
    assert (conditions["Ready"]["reason"], conditions["Ready"]["message"]) == ("WaitingForAdmission", gate.message)
    # admitted hours later, step unchanged: running again with a fresh progress clock, not stalled
    learner = {"status": {"active": 1, "ready": 1}}
    running = compute_status(Observed(now=now, spec=j.spec, learner=learner,
                                      progress=LearnerProgress(step=7, total_steps=100, policy_version=7)), held)
    assert running["phase"] == "Running" and running["lastProgressTime"] == "2026-03-01T12:00:00Z"
    assert not any(c["type"] == "Stalled" for c in running["conditions"])
