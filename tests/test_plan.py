"""Planning without a cluster: spec → children, observations → status. Tables, no mocks.

Every child of every example (and of a set of spec variants) is checked against the official
Kubernetes schemas with kubernetes-validate in strict mode (unknown fields are errors).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from asyncrlhf import api
from asyncrlhf.messages import GeneratorStatus, LearnerProgress
from asyncrlhf_operator import plan
from asyncrlhf_operator.status import (
    Observed, compute_status, learner_action, status_patch, ttl_expired, verdict,
)

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.35"
NATS = "nats://nats.asyncrlhf-system.svc:4222"
OWNER = plan.Owner(name="demo", namespace="team", uid="0b8c4a4e-6b9e-4c55-9d5e-1f0c3a9b7d21")
NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


def job(**spec: Any) -> api.AsyncRLHFJob:
    return api.AsyncRLHFJob.model_validate(
        {"metadata": {"name": OWNER.name, "namespace": OWNER.namespace}, "spec": spec})


def examples() -> list[tuple[str, api.AsyncRLHFJob]]:
    found = []
    for path in sorted((ROOT / "examples").rglob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == api.KIND:
                found.append((path.relative_to(ROOT).as_posix(), api.AsyncRLHFJob.model_validate(doc)))
    return found


VARIANTS = [
    ("defaults", job()),
    ("multi-node-gpu", job(learner={"nodes": 4, "gpusPerNode": 8, "backend": "deepspeed", "zeroStage": 3},
                           generator={"replicas": 8, "resources": {"gpus": 1, "memory": "80Gi"}},
                           model={"policy": "Qwen/Qwen2.5-0.5B-Instruct", "dtype": "bfloat16"})),
    ("existing-claim", job(weightSync={"volumeClaim": "shared-snapshots"})),
    ("deleted-volume", job(weightSync={"retainVolume": False, "storageClass": "nfs", "size": "5Gi"})),
    ("nats-credentials", job(nats={"url": "nats://bus.example:4333", "credentialsSecret": "nats-creds"})),
    ("hub-dataset", job(task={"prompts": {"source": "dataset", "name": "openai/gsm8k"},
                              "reward": {"rule": "gsm8k"}})),
    ("suspended", job(suspend=True, ttlSecondsAfterFinished=60)),
] + examples()


def children(j: api.AsyncRLHFJob, **kw) -> dict[str, dict[str, Any]]:
    return {c["kind"]: c for c in plan.desired_children(j, OWNER, NATS, **kw)}


def test_the_examples_are_among_the_variants():
    assert examples(), "no AsyncRLHFJob found in examples/"


def test_the_pods_environment_is_what_the_workloads_read():
    from asyncrlhf.workload_env import GENERATOR_ID, WorkloadEnv

    pods = {kind: children(job())[kind]["spec"]["template"]["spec"]["containers"][0]["env"]
            for kind in ("Job", "Deployment")}
    learner = WorkloadEnv.for_learner({e["name"]: e["value"] for e in pods["Job"] if "value" in e})
    assert (learner.nats_url, learner.snapshot_dir) == (NATS, plan.SNAPSHOT_DIR)
    generator_env = {e["name"]: e for e in pods["Deployment"]}
    assert WorkloadEnv.for_generator({e: v["value"] for e, v in generator_env.items() if "value" in v}).nats_url == NATS
    assert generator_env[GENERATOR_ID]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def env_of(child: dict[str, Any]) -> dict[str, Any]:
    container = child["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# ---------------------------------------------------------------------------------------------
# Children: official schemas and invariants


STRICT = [(n, j, False) for n, j in VARIANTS] + [("finished", job(), True)]


@pytest.mark.parametrize("name,j,finished", STRICT, ids=[n for n, _, _ in STRICT])
def test_every_child_validates_strictly(name, j, finished):
    for child in plan.desired_children(j, OWNER, NATS, finished=finished):
        kubernetes_validate.validate(child, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name,j", VARIANTS, ids=[n for n, _ in VARIANTS])
def test_children_are_labelled_and_owned(name, j):
    for child in plan.desired_children(j, OWNER, NATS):
        meta = child["metadata"]
        assert meta["namespace"] == OWNER.namespace
        assert set(meta["labels"]) == {"app.kubernetes.io/name", "app.kubernetes.io/instance",
                                       "app.kubernetes.io/component", "app.kubernetes.io/managed-by"}
        retained = meta["name"] == "demo-snapshots" and j.spec.weight_sync.retain_volume  # the model cache is owned
        owners = meta.get("ownerReferences", [])
        assert owners == ([] if retained else [plan.owner_reference(OWNER)]), child["kind"]


@pytest.mark.parametrize("name,j", VARIANTS, ids=[n for n, _ in VARIANTS])
def test_pods_are_restricted(name, j):
    for kind in ("Job", "Deployment"):
        pod = children(j)[kind]["spec"]["template"]["spec"]
        assert pod["securityContext"] == {
            "runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"}}
        assert pod["automountServiceAccountToken"] is False
        assert pod["serviceAccountName"] == "demo-workload"
        for container in pod["containers"]:
            assert container["securityContext"] == {
                "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert {"/tmp", "/cache", "/etc/asyncrlhf", "/snapshots"} <= mounts
            for var in container["env"]:  # secrets only by reference
                assert "PASSWORD" not in var["name"] or "secretKeyRef" in var["valueFrom"]


def test_children_in_creation_order():
    kinds = [c["kind"] for c in plan.desired_children(job(), OWNER, NATS)]
    assert kinds == ["ServiceAccount", "ConfigMap", "PersistentVolumeClaim", "Service",
                     "NetworkPolicy", "Job", "Deployment"]


# ---------------------------------------------------------------------------------------------
# Children: spec → fields


def dig(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(obj, list):
            obj = obj[int(part)] if int(part) < len(obj) else None
        else:
            obj = obj.get(part) if isinstance(obj, dict) else None
        if obj is None:
            return None
    return obj


POD = "spec.template.spec"
CONTAINER = f"{POD}.containers.0"
FIELDS = [
    ("replicas", job(generator={"replicas": 5}), {}, "Deployment", "spec.replicas", 5),
    ("suspend scales generators", job(suspend=True, generator={"replicas": 5}), {}, "Deployment", "spec.replicas", 0),
    ("suspend suspends learner", job(suspend=True), {}, "Job", "spec.suspend", True),
    ("running learner", job(), {}, "Job", "spec.suspend", False),
    ("finished scales generators", job(generator={"replicas": 5}), {"finished": True}, "Deployment",
     "spec.replicas", 0),
    ("indexed", job(learner={"nodes": 3}), {}, "Job", "spec.completionMode", "Indexed"),
    ("completions", job(learner={"nodes": 3}), {}, "Job", "spec.completions", 3),
    ("parallelism", job(learner={"nodes": 3}), {}, "Job", "spec.parallelism", 3),
    ("gang restart", job(), {}, "Job", "spec.backoffLimit", 0),
    ("disruptions ignored", job(), {}, "Job", "spec.podFailurePolicy.rules.0.action", "Ignore"),
    ("never restart in place", job(), {}, "Job", f"{POD}.restartPolicy", "Never"),
    ("rendezvous subdomain", job(), {}, "Job", f"{POD}.subdomain", "demo-learner"),
    ("learner gpus", job(learner={"gpusPerNode": 8}), {}, "Job", f"{CONTAINER}.resources.limits.nvidia.com/gpu", None),
    ("no gpus no toleration", job(), {}, "Deployment", f"{POD}.tolerations", None),
    ("gpu toleration", job(generator={"resources": {"gpus": 1}}), {}, "Deployment",
     f"{POD}.tolerations.0.key", "nvidia.com/gpu"),
    ("learner command", job(), {}, "Job", f"{CONTAINER}.args",
     ["learner", "--config", "/etc/asyncrlhf/job.yaml"]),
    ("generator command", job(), {}, "Deployment", f"{CONTAINER}.args",
     ["generator", "--config", "/etc/asyncrlhf/job.yaml"]),
    ("image", job(image="registry.local/arj:1"), {}, "Deployment", f"{CONTAINER}.image", "registry.local/arj:1"),
    ("config volume", job(), {}, "Deployment", f"{POD}.volumes.0.configMap.name", "demo-config"),
    ("own claim", job(), {}, "Job", f"{POD}.volumes.1.persistentVolumeClaim.claimName", "demo-snapshots"),
    ("given claim", job(weightSync={"volumeClaim": "mine"}), {}, "Job",
     f"{POD}.volumes.1.persistentVolumeClaim.claimName", "mine"),
    ("rwx", job(), {}, "PersistentVolumeClaim", "spec.accessModes", ["ReadWriteMany"]),
    ("size", job(weightSync={"size": "7Gi"}), {}, "PersistentVolumeClaim", "spec.resources.requests.storage", "7Gi"),
    ("storage class", job(weightSync={"storageClass": "nfs"}), {}, "PersistentVolumeClaim",
     "spec.storageClassName", "nfs"),
    ("default storage class", job(), {}, "PersistentVolumeClaim", "spec.storageClassName", None),
    ("headless", job(), {}, "Service", "spec.clusterIP", "None"),
    ("no token", job(), {}, "ServiceAccount", "automountServiceAccountToken", False),
    ("np selects the job", job(), {}, "NetworkPolicy", "spec.podSelector.matchLabels",
     {"app.kubernetes.io/name": "asyncrlhf", "app.kubernetes.io/instance": "demo"}),
    ("np ingress: learners, and scrapes on the metrics port", job(), {}, "NetworkPolicy", "spec.ingress",
     [{"from": [{"podSelector": {"matchLabels": plan.selector(OWNER, "learner")}}]},
      {"ports": [{"protocol": "TCP", "port": 9410}]}]),
    ("np nats port", job(nats={"url": "nats://a:4333,nats://b:4334"}), {}, "NetworkPolicy",
     "spec.egress.1.ports", [{"protocol": "TCP", "port": 4333}, {"protocol": "TCP", "port": 4334}]),
    ("np no https for builtin", job(), {}, "NetworkPolicy", "spec.egress.3", None),
    ("np https for hub model", job(model={"policy": "Qwen/Qwen2.5-0.5B"}), {}, "NetworkPolicy",
     "spec.egress.3.ports", [{"protocol": "TCP", "port": 443}]),
    ("np no https for volume path", job(model={"policy": "/models/qwen"}), {}, "NetworkPolicy", "spec.egress.3", None),
]


@pytest.mark.parametrize("case,j,kw,kind,path,expected", FIELDS, ids=[f[0] for f in FIELDS])
def test_child_field(case, j, kw, kind, path, expected):
    child = children(j, **kw)[kind]
    if path.endswith("nvidia.com/gpu"):  # the key has dots
        assert child["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    else:
        assert dig(child, path) == expected


def test_existing_claim_means_no_pvc():
    assert "PersistentVolumeClaim" not in children(job(weightSync={"volumeClaim": "mine"}))


ENV = [
    ("nats default", job(), "Deployment", "ASYNCRLHF_NATS_URL", NATS),
    ("nats from spec", job(nats={"url": "nats://x:1"}), "Job", "ASYNCRLHF_NATS_URL", "nats://x:1"),
    ("snapshots", job(), "Job", "ASYNCRLHF_SNAPSHOT_DIR", "/snapshots"),
    ("generator id", job(), "Deployment", "GENERATOR_ID", {"fieldRef": {"fieldPath": "metadata.name"}}),
    ("rank", job(), "Job", "RANK", {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}),
    ("world size", job(learner={"nodes": 4}), "Job", "WORLD_SIZE", "4"),
    ("procs per gpu", job(learner={"gpusPerNode": 8}), "Job", "NPROC_PER_NODE", "8"),
    ("procs on cpu", job(learner={"processesPerNode": 2}), "Job", "NPROC_PER_NODE", "2"),
    ("master", job(), "Job", "MASTER_ADDR", "demo-learner-0.demo-learner"),
    ("port", job(), "Job", "MASTER_PORT", "29500"),
    ("password by reference", job(nats={"credentialsSecret": "s"}), "Job", "ASYNCRLHF_NATS_PASSWORD",
     {"secretKeyRef": {"name": "s", "key": "password", "optional": True}}),
    ("creds file", job(nats={"credentialsSecret": "s"}), "Deployment", "ASYNCRLHF_NATS_CREDS",
     "/var/run/asyncrlhf/nats/creds"),
    ("no credentials", job(), "Deployment", "ASYNCRLHF_NATS_USER", None),
]


@pytest.mark.parametrize("case,j,kind,var,expected", ENV, ids=[e[0] for e in ENV])
def test_env(case, j, kind, var, expected):
    assert env_of(children(j)[kind]).get(var) == expected


# ---------------------------------------------------------------------------------------------
# The rendered config


def test_config_round_trips_without_runtime_fields():
    j = job(generator={"replicas": 4}, suspend=True, ttlSecondsAfterFinished=5,
            algorithm={"loss": "rloo"})
    text = children(j)["ConfigMap"]["data"]["job.yaml"]
    data = yaml.safe_load(text)
    assert "replicas" not in data["spec"]["generator"]
    assert "suspend" not in data["spec"] and "ttlSecondsAfterFinished" not in data["spec"]
    assert data["metadata"] == {"name": "demo", "namespace": "team"}
    again = api.AsyncRLHFJob.model_validate(data)
    assert again.spec.algorithm == j.spec.algorithm and again.spec.learner == j.spec.learner


HASH = [
    ("replicas", {"generator": {"replicas": 9}}, False),
    ("suspend", {"suspend": True}, False),
    ("ttl", {"ttlSecondsAfterFinished": 3}, False),
    ("temperature", {"generator": {"sampling": {"temperature": 0.3}}}, True),
    ("image", {"image": "other:1"}, True),
    ("loss", {"algorithm": {"loss": "grpo"}}, True),
]


@pytest.mark.parametrize("case,spec,changes", HASH, ids=[h[0] for h in HASH])
def test_config_hash_changes_only_with_the_config(case, spec, changes):
    assert (plan.config_hash(job(**spec)) != plan.config_hash(job())) == changes


# ---------------------------------------------------------------------------------------------
# Observations → status

SPEC = job(learner={"nodes": 2, "totalSteps": 50, "backoffLimit": 2},
           generator={"replicas": 3}).spec


def learner_job(active=0, ready=None, condition=None, message="", deleting=False) -> dict:
    status: dict[str, Any] = {"active": active}
    if ready is not None:
        status["ready"] = ready
    if condition:
        status["conditions"] = [{"type": condition, "status": "True", "reason": condition, "message": message}]
    meta = {"name": "demo-learner", **({"deletionTimestamp": "2026-03-01T11:00:00Z"} if deleting else {})}
    return {"metadata": meta, "status": status}


def progress(step=10, **kw) -> LearnerProgress:
    fields = dict(step=step, total_steps=50, policy_version=step, rollouts_consumed=step * 16,
                  staleness_mean=0.5, staleness_max=1, reward_mean=0.25, updated=NOW.timestamp())
    fields.update(kw)
    return LearnerProgress(**fields)


def obs(**kw) -> Observed:
    fields: dict[str, Any] = dict(now=NOW, generation=3, spec=SPEC)
    fields.update(kw)
    return Observed(**fields)


RUNNING = {"phase": "Running", "startTime": "2026-03-01T10:00:00Z", "conditions": []}
SUCCEEDED = {"phase": "Succeeded", "completionTime": "2026-03-01T11:00:00Z", "conditions": [
    {"type": "Succeeded", "status": "True", "reason": "Completed", "message": "trained 50 steps",
     "lastTransitionTime": "2026-03-01T11:00:00Z"}]}
INVALID = {"phase": "Failed", "conditions": [
    {"type": "Failed", "status": "True", "reason": "SpecInvalid", "message": "x",
     "lastTransitionTime": "2026-03-01T11:00:00Z"}]}

PHASES = [
    ("nothing yet", obs(), {}, "Pending", "Starting"),
    ("pods pending", obs(learner=learner_job(active=2, ready=0)), {}, "Pending", "Starting"),
    ("one of two ready", obs(learner=learner_job(active=2, ready=1)), {}, "Pending", "Starting"),
    ("all ready", obs(learner=learner_job(active=2, ready=2)), {}, "Running", "Training"),
    ("old apiserver without ready", obs(learner=learner_job(active=2)), {}, "Running", "Training"),
    ("progress keeps running", obs(learner=learner_job(active=2, ready=1), progress=progress()), RUNNING,
     "Running", "Training"),
    ("learner failed, restarts left", obs(learner=learner_job(condition="Failed"), restarts=1), RUNNING,
     "Running", "LearnerRestarting"),
    ("learner being deleted", obs(learner=learner_job(deleting=True), restarts=1), RUNNING,
     "Running", "LearnerRestarting"),
    ("learner recreated", obs(learner=None, restarts=1), RUNNING, "Running", "LearnerRestarting"),
    ("backoff exhausted", obs(learner=learner_job(condition="Failed", message="OOMKilled"), restarts=2),
     RUNNING, "Failed", "BackoffLimitExceeded"),
    ("job complete", obs(learner=learner_job(condition="Complete")), RUNNING, "Succeeded", "Completed"),
    ("progress done", obs(learner=learner_job(active=2, ready=2), progress=progress(50, done=True)),
     RUNNING, "Succeeded", "Completed"),
    ("suspended", obs(spec=job(suspend=True).spec), RUNNING, "Suspended", "Suspended"),
    ("suspended beats a failed learner", obs(spec=job(suspend=True).spec,
                                             learner=learner_job(condition="Failed"), restarts=9),
     RUNNING, "Suspended", "Suspended"),
    ("invalid spec", obs(spec=None, spec_error="spec.learner.nodes: must be >= 1"), {}, "Failed",
     "SpecInvalid"),
    ("succeeded sticks", obs(learner=None), SUCCEEDED, "Succeeded", "Completed"),
    ("fixed spec clears SpecInvalid", obs(learner=learner_job(active=2, ready=2)), INVALID, "Running",
     "Training"),
]


@pytest.mark.parametrize("case,o,previous,phase,reason", PHASES, ids=[p[0] for p in PHASES])
def test_phase(case, o, previous, phase, reason):
    v = verdict(o, previous)
    assert (v.phase, v.reason) == (phase, reason)
    status = compute_status(o, previous)
    assert status["phase"] == phase
    api.JobStatus.model_validate(status)


def conditions_of(status):
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


CONDITIONS = [
    ("pending", obs(), {}, {"Ready": ("False", "Starting"), "Progressing": ("True", "Starting"),
                            "Suspended": ("False", "NotSuspended")}),
    ("generators not ready", obs(learner=learner_job(active=2, ready=2), generators={"readyReplicas": 1}), {},
     {"Ready": ("False", "GeneratorsNotReady"), "Progressing": ("True", "Training"),
      "Suspended": ("False", "NotSuspended")}),
    ("all ready", obs(learner=learner_job(active=2, ready=2), generators={"readyReplicas": 3}), {},
     {"Ready": ("True", "AllReady"), "Progressing": ("True", "Training"),
      "Suspended": ("False", "NotSuspended")}),
    ("suspended", obs(spec=job(suspend=True).spec), {},
     {"Ready": ("False", "Suspended"), "Progressing": ("False", "Suspended"),
      "Suspended": ("True", "Suspended")}),
    ("succeeded", obs(learner=learner_job(condition="Complete")), {},
     {"Ready": ("False", "Completed"), "Progressing": ("False", "Completed"),
      "Suspended": ("False", "NotSuspended"), "Succeeded": ("True", "Completed")}),
    ("failed", obs(learner=learner_job(condition="Failed"), restarts=2), {},
     {"Ready": ("False", "BackoffLimitExceeded"), "Progressing": ("False", "BackoffLimitExceeded"),
      "Suspended": ("False", "NotSuspended"), "Failed": ("True", "BackoffLimitExceeded")}),
    ("invalid", obs(spec=None, spec_error="spec.x: bad"), {},
     {"Ready": ("False", "SpecInvalid"), "Progressing": ("False", "SpecInvalid"),
      "Suspended": ("False", "NotSuspended"), "Failed": ("True", "SpecInvalid"),
      "SpecInvalid": ("True", "InvalidField")}),
    ("invalid then fixed keeps the False conditions", obs(learner=learner_job(active=2, ready=2),
                                                          generators={"readyReplicas": 3}),
     compute_status(obs(spec=None, spec_error="spec.x: bad"), {}),
     {"Ready": ("True", "AllReady"), "Progressing": ("True", "Training"),
      "Suspended": ("False", "NotSuspended"), "Failed": ("False", "NotFailed"),
      "SpecInvalid": ("False", "Valid")}),
]


@pytest.mark.parametrize("case,o,previous,expected", CONDITIONS, ids=[c[0] for c in CONDITIONS])
def test_conditions(case, o, previous, expected):
    assert conditions_of(compute_status(o, previous)) == expected


def test_failure_message_names_the_cause():
    status = compute_status(obs(learner=learner_job(condition="Failed", message="Pod OOMKilled"),
                                restarts=2), RUNNING)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert "Pod OOMKilled" in failed["message"] and "2 restarts" in failed["message"]
    status = compute_status(obs(learner=learner_job(condition="Failed"), restarts=2,
                                progress=progress(failed="NaN loss at step 7")), RUNNING)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert "NaN loss at step 7" in failed["message"]


def test_invalid_spec_condition_names_the_field():
    status = compute_status(obs(spec=None, spec_error="spec.async.maxStaleness: too small"), {})
    invalid = next(c for c in status["conditions"] if c["type"] == "SpecInvalid")
    assert invalid["message"] == "spec.async.maxStaleness: too small"


def test_transition_time_kept_while_unchanged():
    first = compute_status(obs(learner=learner_job(active=2, ready=2)), {})
    later = compute_status(Observed(now=NOW + timedelta(minutes=5), generation=3, spec=SPEC,
                                    learner=learner_job(active=2, ready=2)), first)
    assert later["conditions"] == first["conditions"]
    suspended = compute_status(Observed(now=NOW + timedelta(minutes=6), spec=job(suspend=True).spec), later)
    changed = {c["type"]: c["lastTransitionTime"] for c in suspended["conditions"]}
    assert changed["Suspended"] == "2026-03-01T12:06:00Z"


def test_status_fields_from_the_bus():
    reports = (
        GeneratorStatus(generator_id="g-a", policy_version=9, rollouts=100, tokens_per_second=40.0,
                        updated=NOW.timestamp() - 5),
        GeneratorStatus(generator_id="g-b", policy_version=10, rollouts=50, tokens_per_second=60.0,
                        updated=NOW.timestamp()),
        GeneratorStatus(generator_id="g-gone", policy_version=2, rollouts=30, tokens_per_second=99.0,
                        updated=NOW.timestamp() - 3600),
    )
    status = compute_status(obs(learner=learner_job(active=2, ready=2), progress=progress(10),
                                reports=reports, restarts=1), {})
    assert status["step"] == 10 and status["policyVersion"] == 10
    assert status["generatorVersions"] == {"g-a": 9, "g-b": 10}
    assert status["rolloutsProduced"] == 180 and status["rolloutsConsumed"] == 160
    assert status["tokensPerSecond"] == 100.0
    assert (status["stalenessMean"], status["stalenessMax"], status["rewardMean"]) == (0.5, 1, 0.25)
    assert status["observedGeneration"] == 3 and status["restarts"] == 1
    assert status["startTime"] == "2026-03-01T12:00:00Z" and "completionTime" not in status


def test_progress_kept_while_the_bus_is_silent():
    first = compute_status(obs(learner=learner_job(active=2, ready=2), progress=progress(10)), {})
    second = compute_status(obs(learner=learner_job(active=2, ready=2)), first)
    assert second["step"] == 10 and second["rewardMean"] == 0.25


def test_completion_time_set_once():
    done = compute_status(obs(learner=learner_job(condition="Complete")), RUNNING)
    assert done["completionTime"] == "2026-03-01T12:00:00Z"
    later = compute_status(Observed(now=NOW + timedelta(hours=1), spec=SPEC), done)
    assert later["completionTime"] == "2026-03-01T12:00:00Z"


ACTIONS = [
    ("running", obs(learner=learner_job(active=2, ready=2)), "", "none"),
    ("failed first time", obs(learner=learner_job(condition="Failed")), "Running", "restart"),
    ("failed target", obs(learner=learner_job(condition="FailureTarget"), restarts=1), "Running", "restart"),
    ("failed at the limit", obs(learner=learner_job(condition="Failed"), restarts=2), "Running", "fail"),
    ("no restarts allowed", obs(spec=job(learner={"backoffLimit": 0}).spec,
                                learner=learner_job(condition="Failed")), "Running", "fail"),
    ("suspended", obs(spec=job(suspend=True).spec, learner=learner_job(condition="Failed")), "Running", "none"),
    ("already failed", obs(learner=learner_job(condition="Failed"), restarts=2), "Failed", "none"),
    ("invalid spec", obs(spec=None), "", "none"),
    ("absent", obs(), "Running", "none"),
]


@pytest.mark.parametrize("case,o,previous_phase,action", ACTIONS, ids=[a[0] for a in ACTIONS])
def test_learner_action(case, o, previous_phase, action):
    assert learner_action(o, previous_phase) == action


TTL = [
    ("no ttl", job().spec, SUCCEEDED, NOW, False),
    ("not finished", job(ttlSecondsAfterFinished=0).spec, RUNNING, NOW, False),
    ("ttl not reached", job(ttlSecondsAfterFinished=7200).spec, SUCCEEDED, NOW, False),
    ("ttl reached", job(ttlSecondsAfterFinished=3600).spec, SUCCEEDED, NOW, True),
    ("zero ttl", job(ttlSecondsAfterFinished=0).spec, {**INVALID, "completionTime": "2026-03-01T12:00:00Z"},
     NOW, True),
    ("invalid spec", None, SUCCEEDED, NOW, False),
]


@pytest.mark.parametrize("case,spec,status,now,expired", TTL, ids=[t[0] for t in TTL])
def test_ttl(case, spec, status, now, expired):
    assert ttl_expired(spec, status, now) == expired


PATCHES = [
    ("unchanged", {"a": 1}, {"a": 1}, {}),
    ("changed", {"a": 1}, {"a": 2}, {"a": 2}),
    ("removed", {"a": 1, "b": 2}, {"a": 1}, {"b": None}),
    ("map key removed", {"m": {"x": 1, "y": 2}}, {"m": {"x": 1}}, {"m": {"y": None}}),
    ("list replaced", {"l": [1]}, {"l": [2]}, {"l": [2]}),
]


@pytest.mark.parametrize("case,old,new,patch", PATCHES, ids=[p[0] for p in PATCHES])
def test_status_patch(case, old, new, patch):
    assert status_patch(old, new) == patch


# ---------------------------------------------------------------------------------------------
# Handler helpers that are pure: what a spec change touches, how a bad spec is reported

from asyncrlhf_operator.validation import validate  # noqa: E402

CHANGES = [
    ("replicas", [("change", ("generator", "replicas"), 1, 3)], {"Deployment"}),
    ("replicas with a spec prefix", [("change", ("spec", "generator", "replicas"), 1, 3)], {"Deployment"}),
    ("suspend", [("change", ("suspend",), False, True)], {"Job", "Deployment"}),
    ("suspend and replicas", [("change", ("suspend",), False, True),
                              ("change", ("generator", "replicas"), 1, 2)], {"Job", "Deployment"}),
    ("ttl only", [("add", ("ttlSecondsAfterFinished",), None, 60)], set()),
    ("volume snapshots (the status timer's)", [("change", ("weightSync", "volumeSnapshots", "enabled"), False, True)],
     set()),
    ("volume snapshots and replicas", [("change", ("weightSync", "volumeSnapshots", "keep"), 3, 5),
                                       ("change", ("generator", "replicas"), 1, 2)], {"Deployment"}),
    ("temperature", [("change", ("generator", "sampling", "temperature"), 0.7, 0.3)], None),
    ("whole generator", [("add", ("generator",), None, {"replicas": 2})], None),
    ("replicas and image", [("change", ("generator", "replicas"), 1, 3), ("change", ("image",), "a", "b")],
     None),
]


@pytest.mark.parametrize("case,diff,kinds", CHANGES, ids=[c[0] for c in CHANGES])
def test_what_a_spec_change_touches(case, diff, kinds):
    assert plan.kinds_for(plan.changed_paths(diff)) == kinds


INVALID = [
    ("bound", {"generator": {"replicas": -1}}, "spec.generator.replicas: "),
    ("enum", {"algorithm": {"loss": "sft"}}, "spec.algorithm.loss: "),
    ("typo", {"generator": {"replica": 2}}, "spec.generator.replica: Extra inputs"),
    ("cross-field", {"algorithm": {"samplesPerPrompt": 1}}, "spec.algorithm.samplesPerPrompt: this loss"),
    ("cross-field staleness", {"weightSync": {"everySteps": 5}}, "spec.async.maxStaleness: the staleness"),
]


@pytest.mark.parametrize("case,spec,prefix", INVALID, ids=[i[0] for i in INVALID])
def test_invalid_spec_names_the_field(case, spec, prefix):
    job, error = validate({"metadata": {"name": "demo", "namespace": "team"}, "spec": spec})
    assert job is None and error.startswith(prefix), error


def test_valid_body_with_server_metadata():
    body = {"apiVersion": api.API_VERSION, "kind": api.KIND, "status": {"phase": "Running"},
            "metadata": {"name": "demo", "namespace": "team", "uid": "u", "resourceVersion": "9",
                         "finalizers": ["asyncrlhf.dev/cleanup"]}, "spec": {"generator": {"replicas": 2}}}
    job, error = validate(body)
    assert error == "" and job.spec.generator.replicas == 2 and job.metadata.namespace == "team"


def test_operator_needs_a_scope(monkeypatch):
    from asyncrlhf_operator import main

    monkeypatch.setattr(main, "IN_CLUSTER_NAMESPACE", "/nonexistent")
    with pytest.raises(ValueError, match="--namespace"):
        main.run()
    with pytest.raises(ValueError, match="not both"):
        main.run(namespace="a", all_namespaces=True)


def test_operator_command_passes_its_intervals_and_its_help_shows_the_real_defaults(monkeypatch, capsys):
    from asyncrlhf import cli
    from asyncrlhf_operator import main as operator_main
    from asyncrlhf_operator.settings import OperatorConfig

    seen = {}
    monkeypatch.setattr(operator_main, "run", lambda **kwargs: seen.update(kwargs))
    assert cli.main(["operator", "--all-namespaces", "--resync-interval", "7"]) == 0
    assert seen["all_namespaces"] and seen["resync_interval"] == 7.0
    assert "status_interval" not in seen  # unset: main.run's default, which is OperatorConfig's
    with pytest.raises(SystemExit) as done:
        cli.main(["operator", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps and indents as the terminal allows

    def help_of(option: str) -> str:
        return text.split(f" {option} {option[2:].replace('-', '_').upper()} ")[1].split(" --")[0]

    assert f"default {OperatorConfig.status_interval:g})" in help_of("--status-interval")
    assert f"default {OperatorConfig.resync_interval:g})" in help_of("--resync-interval")


def test_the_operators_default_bus_is_the_flag_then_the_environment_then_the_charts():
    from asyncrlhf_operator.settings import DEFAULT_NATS_URL, OperatorConfig, default_nats_url

    assert default_nats_url("nats://given:4222", {"ASYNCRLHF_NATS_URL": "nats://env:4222"}) == "nats://given:4222"
    assert default_nats_url("", {"ASYNCRLHF_NATS_URL": "nats://env:4222"}) == "nats://env:4222"
    assert default_nats_url("", {}) == DEFAULT_NATS_URL == OperatorConfig().nats_url


# --- CSI VolumeSnapshots of the volume ------------------------------------------------------


SNAPSHOTS = {"weightSync": {"volumeSnapshots": {"enabled": True, "everySteps": 100, "keep": 2}}}


@pytest.mark.parametrize("step, taken, take, drop, kept", [
    (99, [], None, [], []),                                    # before the first multiple
    (100, [], "demo-step-100", [], ["demo-step-100"]),
    (150, ["demo-step-100"], None, [], ["demo-step-100"]),     # already taken: a repeated pass is a no-op
    (230, ["demo-step-100"], "demo-step-200", [], ["demo-step-100", "demo-step-200"]),
    (300, ["demo-step-100", "demo-step-200"], "demo-step-300", ["demo-step-100"], ["demo-step-200", "demo-step-300"]),
    (1000, ["demo-step-200", "demo-step-300"], "demo-step-1000", ["demo-step-200"],
     ["demo-step-300", "demo-step-1000"]),                     # a slow status pass skips multiples, not the newest
])
def test_volume_snapshot_plan(step, taken, take, drop, kept):
    assert plan.volume_snapshot_plan(job(**SNAPSHOTS), step, taken) == (take, drop, kept)


def test_no_volume_snapshots_unless_enabled():
    assert plan.volume_snapshot_plan(job(), 10_000, []) == (None, [], [])


@pytest.mark.parametrize("sync, claim, owned", [
    ({}, "demo-snapshots", False),                                          # retained volume: kept
    ({"retainVolume": False, "volumeSnapshots": {"className": "csi-fast"}}, "demo-snapshots", True),
    ({"volumeClaim": "shared-rwx"}, "shared-rwx", False),
])
def test_volume_snapshot_manifest(sync, claim, owned):
    snap = plan.volume_snapshot(job(weightSync=sync), OWNER, "demo-step-100")
    # the shape of snapshot.storage.k8s.io/v1 VolumeSnapshot (a CRD: no official schema to check)
    assert snap["apiVersion"] == "snapshot.storage.k8s.io/v1" and snap["kind"] == "VolumeSnapshot"
    assert snap["metadata"]["name"] == "demo-step-100" and snap["metadata"]["namespace"] == "team"
    assert snap["spec"]["source"] == {"persistentVolumeClaimName": claim}
    assert snap["spec"].get("volumeSnapshotClassName") == (sync.get("volumeSnapshots") or {}).get("className")
    assert set(snap["spec"]) <= {"source", "volumeSnapshotClassName"}
    assert ("ownerReferences" in snap["metadata"]) == owned


def test_changing_volume_snapshot_settings_does_not_restart_the_learner():
    before, after = job(), job(**SNAPSHOTS)
    assert plan.config_hash(before) == plan.config_hash(after)
    assert children(before)["ConfigMap"] == children(after)["ConfigMap"]


def test_a_cluster_without_volume_snapshots_gets_one_warning_and_the_status_goes_on(monkeypatch):
    import asyncio
    import types

    from asyncrlhf_operator import handlers
    from asyncrlhf_operator.kube import KubeError

    class NoSnapshotCRD:
        async def apply(self, obj):
            raise KubeError(404, "NotFound", "the server could not find the requested resource")

    warnings = []
    monkeypatch.setattr(handlers.kopf, "warn", lambda body, reason, message: warnings.append((reason, message)))
    monkeypatch.setattr(handlers.kopf, "info", lambda *a, **k: None)
    ctx = types.SimpleNamespace(kube=NoSnapshotCRD(), snapshot_failures={})
    body = {"metadata": {"name": "demo", "namespace": "team", "uid": "u1"}}
    j = job(**SNAPSHOTS)
    for step in (100, 105, 110):  # three status passes: one warning, nothing recorded as taken
        assert asyncio.run(handlers.take_volume_snapshots(ctx, body, j, step, [])) == []
    assert [reason for reason, _ in warnings] == ["VolumeSnapshotFailed"]
    assert "demo-step-100" in warnings[0][1] and "CSI snapshot controller" in warnings[0][1]


def test_retired_generators_count_in_rollouts_produced_but_are_not_live():
    live = GeneratorStatus(generator_id="demo-generator-abc", policy_version=4, rollouts=10,
                           tokens_per_second=50.0, updated=NOW.timestamp() - 3)
    retired = GeneratorStatus(generator_id="_retired", policy_version=0, rollouts=90, updated=0.0)
    status = compute_status(obs(reports=(live, retired)), {})
    assert status["generatorVersions"] == {"demo-generator-abc": 4}
    assert status["rolloutsProduced"] == 100 and status["tokensPerSecond"] == 50.0


# --- pod templates, the model cache, failures you can see --------------------------------------

from asyncrlhf_operator import health  # noqa: E402
from asyncrlhf_operator.plan import strategic_merge  # noqa: E402

MERGES = [
    ("maps merge", {"nodeSelector": {"a": "1"}}, {"nodeSelector": {"b": "2"}}, {"nodeSelector": {"a": "1", "b": "2"}}),
    ("scalar replaced", {"schedulerName": "default"}, {"schedulerName": "volcano"}, {"schedulerName": "volcano"}),
    ("env merged by name, new appended",
     {"containers": [{"name": "g", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]}]},
     {"containers": [{"name": "g", "env": [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}]}]},
     {"containers": [{"name": "g", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "3"},
                                           {"name": "C", "value": "4"}]}]}),
    ("mounts merged by mountPath",
     {"containers": [{"name": "g", "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}]},
     {"containers": [{"name": "g", "volumeMounts": [{"name": "scratch", "mountPath": "/tmp"},
                                                    {"name": "data", "mountPath": "/data"}]}]},
     {"containers": [{"name": "g", "volumeMounts": [{"name": "scratch", "mountPath": "/tmp"},
                                                    {"name": "data", "mountPath": "/data"}]}]}),
    ("volume redefined keeps only its new source (retainKeys)",
     {"volumes": [{"name": "cache", "emptyDir": {}}]},
     {"volumes": [{"name": "cache", "persistentVolumeClaim": {"claimName": "hf"}}]},
     {"volumes": [{"name": "cache", "persistentVolumeClaim": {"claimName": "hf"}}]}),
    ("tolerations appended", {"tolerations": [{"key": "gpu"}]}, {"tolerations": [{"key": "spot"}, {"key": "gpu"}]},
     {"tolerations": [{"key": "gpu"}, {"key": "spot"}]}),
    ("resources merged", {"containers": [{"name": "g", "resources": {"limits": {"memory": "4Gi"}}}]},
     {"containers": [{"name": "g", "resources": {"limits": {"rdma/hca": 1}}}]},
     {"containers": [{"name": "g", "resources": {"limits": {"memory": "4Gi", "rdma/hca": 1}}}]}),
    ("atomic list replaced", {"affinity": {"nodeAffinity": {"x": [1, 2]}}}, {"affinity": {"nodeAffinity": {"x": [3]}}},
     {"affinity": {"nodeAffinity": {"x": [3]}}}),
]


@pytest.mark.parametrize("case,base,overlay,merged", MERGES, ids=[m[0] for m in MERGES])
def test_strategic_merge(case, base, overlay, merged):
    before = yaml.safe_dump(base)
    assert strategic_merge(base, overlay) == merged
    assert yaml.safe_dump(base) == before  # the operator's pod is not modified


OWNED = [
    ("command", {"containers": [{"name": "generator", "command": ["sh"]}]}, "containers[0].command: owned by the operator"),
    ("image", {"containers": [{"name": "learner", "image": "x"}]}, "containers[0].image: owned by the operator"),
    ("bus env", {"containers": [{"name": "generator", "env": [{"name": "ASYNCRLHF_NATS_URL", "value": "x"}]}]},
     "containers[0].env[0]: ASYNCRLHF_NATS_URL is set by the operator"),
    ("rank env", {"containers": [{"name": "learner", "env": [{"name": "RANK", "value": "0"}]}]},
     "containers[0].env[0]: RANK is set by the operator"),
    ("snapshot mount", {"containers": [{"name": "generator", "volumeMounts": [{"name": "x", "mountPath": "/snapshots"}]}]},
     "containers[0].volumeMounts[0]: /snapshots is mounted by the operator"),
    ("config volume", {"volumes": [{"name": "config", "emptyDir": {}}]}, "volumes[0]: volume 'config' is the operator's"),
    ("cpu", {"containers": [{"name": "generator", "resources": {"requests": {"cpu": "8"}}}]},
     "containers[0].resources.requests.cpu: set the job's resources.cpu instead"),
    ("gpu", {"containers": [{"name": "generator", "resources": {"limits": {"nvidia.com/gpu": 2}}}]},
     "containers[0].resources.limits.nvidia.com/gpu: set the job's the GPU count instead"),
    ("sidecar", {"containers": [{"name": "proxy", "image": "envoy"}]}, "containers[0].name: only the workload's container"),
    ("host network", {"hostNetwork": True}, "hostNetwork: not supported in a pod template"),
    ("root", {"securityContext": {"runAsUser": 0}}, "securityContext: the workloads run as non-root"),
    # a value of the wrong type where a mapping belongs: an error naming it, not a crash (found by the fuzz)
    ("context not a mapping", {"securityContext": 1}, "securityContext: must be a mapping, got int"),
    ("resources not a mapping", {"containers": [{"name": "generator", "resources": 3}]},
     "containers[0].resources: must be a mapping, got int"),
    ("limits not a mapping", {"containers": [{"name": "learner", "resources": {"limits": [1]}}]},
     "containers[0].resources.limits: must be a mapping, got list"),
]


@pytest.mark.parametrize("case,spec,message", OWNED, ids=[o[0] for o in OWNED])
def test_what_the_operator_owns_is_refused_naming_the_field(case, spec, message):
    j, error = validate({"metadata": {"name": "demo"}, "spec": {"generator": {"podTemplate": {"spec": spec}}}})
    assert j is None and error.startswith(f"spec.generator.podTemplate.spec: {message}"), error


def test_owned_labels_are_refused():
    j, error = validate({"metadata": {"name": "demo"}, "spec": {"learner": {"podTemplate": {
        "metadata": {"labels": {"app.kubernetes.io/component": "x"}}}}}})
    assert j is None and error.startswith("spec.learner.podTemplate.metadata.labels: "), error


def test_the_owned_lists_cover_everything_the_operator_sets():
    """The refusal rules (spec/pods.py) and the pods the operator builds cannot drift apart."""
    from asyncrlhf.spec import pods as rules

    for kind in ("Job", "Deployment"):
        pod = children(job(model={"tokenSecret": {"name": "hf"}}, nats={"credentialsSecret": "s", "tlsSecret": "t"}))[kind]
        container = pod["spec"]["template"]["spec"]["containers"][0]
        for var in container["env"]:
            assert var["name"] in rules.OWNED_ENV or var["name"].startswith(rules.OWNED_ENV_PREFIX) \
                or var["name"] == plan.HF_TOKEN, var["name"]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert rules.OWNED_MOUNT_PATHS <= mounts | {plan.NATS_CREDS_DIR}
        assert set(container) - set(rules.CONTAINER_FIELDS) >= {"command", "args", "image"}


def test_hf_token_is_refused_in_a_template_only_when_token_secret_is_set():
    # HF_TOKEN from model.tokenSecret wins over nothing: a template may set it when tokenSecret is empty
    mine = job(generator={"podTemplate": {"spec": {"containers": [{"name": "generator", "env": [
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "mine", "key": "t"}}}]}]}}})
    assert env_of(children(mine)["Deployment"])["HF_TOKEN"] == {"secretKeyRef": {"name": "mine", "key": "t"}}


CACHE = [
    ("scratch by default", {}, {"emptyDir": {}}, None),
    ("existing claim", {"claimName": "hf-cache"}, {"persistentVolumeClaim": {"claimName": "hf-cache"}}, None),
    ("created claim", {"size": "200Gi", "storageClass": "filestore"},
     {"persistentVolumeClaim": {"claimName": "demo-model-cache"}},
     {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "200Gi"}},
      "storageClassName": "filestore"}),
]


@pytest.mark.parametrize("case,cache,volume,pvc", CACHE, ids=[c[0] for c in CACHE])
def test_model_cache(case, cache, volume, pvc):
    planned = plan.desired_children(job(model={"cache": cache}), OWNER, NATS)
    for kind in ("Job", "Deployment"):
        pod = next(c for c in planned if c["kind"] == kind)["spec"]["template"]["spec"]
        assert {k: v for k, v in next(v for v in pod["volumes"] if v["name"] == "cache").items() if k != "name"} == volume
    claims = [c for c in planned if c["kind"] == "PersistentVolumeClaim" and c["metadata"]["name"] == "demo-model-cache"]
    assert [c["spec"] for c in claims] == ([pvc] if pvc else [])
    assert all(c["metadata"]["ownerReferences"] for c in claims)  # deleted with the job


def test_access_mode_of_the_snapshot_volume():
    assert children(job(weightSync={"accessMode": "ReadWriteOnce"}))["PersistentVolumeClaim"]["spec"][
        "accessModes"] == ["ReadWriteOnce"]


def test_generators_are_recreated_never_surged():
    assert children(job())["Deployment"]["spec"]["strategy"] == {"type": "Recreate"}


BAD_QUANTITIES = [("learner", {"learner": {"resources": {"memory": "4 GB"}}}, "spec.learner.resources.memory"),
                  ("generator", {"generator": {"resources": {"cpu": "two"}}}, "spec.generator.resources.cpu"),
                  ("volume", {"weightSync": {"size": "20gb"}}, "spec.weightSync.size"),
                  ("cache", {"model": {"cache": {"size": "lots"}}}, "spec.model.cache.size")]


@pytest.mark.parametrize("case,spec,where", BAD_QUANTITIES, ids=[b[0] for b in BAD_QUANTITIES])
def test_bad_quantities_are_refused_by_validation(case, spec, where):
    j, error = validate({"metadata": {"name": "demo"}, "spec": spec})
    assert j is None and error.startswith(f"{where}: ") and "quantity" in error, error


def pod(name="p", waiting=None, last=None, unschedulable=None) -> dict:
    status: dict[str, Any] = {}
    if waiting or last:
        status["containerStatuses"] = [{"name": "generator", "restartCount": 3,
                                        "state": {"waiting": {"reason": waiting, "message": "m"}} if waiting else {},
                                        "lastState": {"terminated": {"reason": last, "exitCode": 137}} if last else {}}]
    if unschedulable:
        status["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                 "message": unschedulable}]
    return {"metadata": {"name": name}, "status": status}


PROBLEMS = [
    ("healthy", [pod()], None),
    ("image pull", [pod(waiting="ImagePullBackOff")], "ImagePullBackOff"),
    ("pull error", [pod(waiting="ErrImagePull")], "ErrImagePull"),
    ("missing secret", [pod(waiting="CreateContainerConfigError")], "CreateContainerConfigError"),
    ("crash loop", [pod(waiting="CrashLoopBackOff")], "CrashLoopBackOff"),
    ("crash loop from OOM", [pod(waiting="CrashLoopBackOff", last="OOMKilled")], "OOMKilled"),
    ("unschedulable", [pod(unschedulable="0/4 nodes: insufficient nvidia.com/gpu")], "Unschedulable"),
    ("worst first", [pod("a", unschedulable="x"), pod("b", waiting="ImagePullBackOff")], "ImagePullBackOff"),
    ("restarted fine", [pod(last="OOMKilled")], None),  # an old crash, running now
]


@pytest.mark.parametrize("case,pods,reason", PROBLEMS, ids=[p[0] for p in PROBLEMS])
def test_pod_problems(case, pods, reason):
    found = health.pod_problem(pods)
    assert (found.reason if found else None) == reason


def test_a_crash_loop_quotes_what_the_container_said_last():
    """The workload containers leave their last log lines as the termination message
    (FallbackToLogsOnError); the problem quotes the `error:` line the workloads print before exit 2."""
    for kind in ("Job", "Deployment"):
        for c in children(job())[kind]["spec"]["template"]["spec"]["containers"]:
            assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    crashed = pod(waiting="CrashLoopBackOff", last="Error")
    crashed["status"]["containerStatuses"][0]["lastState"]["terminated"]["message"] = (
        "2026-12-02 08:00:00 INFO asyncrlhf.engines: loading\nerror: the bus takes messages of at most 1048576 "
        "bytes (its max_payload), but spec.nats.maxMessageBytes is 8388608: ...\nTraceback-free exit\n")
    found = health.pod_problem([crashed])
    assert found.reason == "Error" and found.message.endswith(
        "keeps failing (Error, exit code 137, 3 restarts): error: the bus takes messages of at most 1048576 bytes "
        "(its max_payload), but spec.nats.maxMessageBytes is 8388608: ...")
    assert health.said_last("one\n  error: two  \nthree\n") == "error: two" and health.said_last("") == ""
    assert health.said_last("INFO connecting to https://user:secret@host\n") == ""  # only error: lines are quoted
    long = health.said_last("error: " + "x" * 1000)
    assert len(long) == health.SAID_MAX and long.endswith("…")
    silent = pod(waiting="CrashLoopBackOff", last="Error")
    assert health.pod_problem([silent]).message.endswith("3 restarts)")  # nothing said: nothing quoted


def test_a_learner_that_failed_for_good_is_quoted_in_the_failed_condition():
    """A learner pod that exits 2 before it reaches the bus (no progress report) leaves its
    `error:` line in its termination message; the Failed condition quotes it after the Job's own."""
    def learner_pod(state: str, code: int, message: str) -> dict:
        ended = {"terminated": {"exitCode": code, "reason": "Error" if code else "Completed", "message": message}}
        return {"metadata": {"name": "demo-learner-0-x"}, "status": {"containerStatuses": [
            {"name": "learner", **({"state": ended} if state == "state" else {"state": {}, "lastState": ended})}]}}

    said = "INFO loading\nerror: model Qwen/Nope not found on the hub (check spec.model.policy)\n"
    for state in ("state", "lastState"):
        o = obs(learner=learner_job(condition="Failed", message="Job has reached the specified backoff limit"),
                restarts=2, pods=(pod("gen", waiting="ImagePullBackOff"), learner_pod(state, 2, said)))
        failed = next(c for c in compute_status(o, {})["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "BackoffLimitExceeded" and failed["message"].endswith(
            "Job has reached the specified backoff limit; the learner said: error: model Qwen/Nope not found on "
            "the hub (check spec.model.policy)"), failed
    quiet = obs(learner=learner_job(condition="Failed", message="BackoffLimitExceeded"), restarts=2,
                pods=(learner_pod("state", 0, "done\n"),))  # a clean exit says nothing worth quoting
    assert next(c for c in compute_status(quiet, {})["conditions"] if c["type"] == "Failed")["message"].endswith(
        "): BackoffLimitExceeded")


def claim(phase, modes=("ReadWriteMany",)) -> dict:
    return {"metadata": {"name": "demo-snapshots"}, "spec": {"accessModes": list(modes)}, "status": {"phase": phase}}


def test_an_unbound_volume_is_the_reason_when_pods_wait_for_it():
    waiting = obs(pods=(pod(unschedulable="pod has unbound immediate PersistentVolumeClaims"),),
                  claims=(claim("Pending"),))
    status = compute_status(waiting, {})
    progressing = next(c for c in status["conditions"] if c["type"] == "Progressing")
    assert (status["phase"], progressing["reason"]) == ("Pending", "VolumeNotBound")
    assert "ReadWriteMany" in progressing["message"] and "docs/install.md" in progressing["message"]
    bound = compute_status(obs(pods=(pod(unschedulable="insufficient cpu"),), claims=(claim("Bound"),)), {})
    assert next(c for c in bound["conditions"] if c["type"] == "Progressing")["reason"] == "Unschedulable"
    # Pending while pods are not yet scheduled (WaitForFirstConsumer) is no problem on its own
    assert next(c for c in compute_status(obs(claims=(claim("Pending"),)), {})["conditions"]
                if c["type"] == "Progressing")["reason"] == "Starting"


STALL_SPEC = job(progressDeadlineSeconds=600).spec
STALLS = [
    ("advanced", dict(progress=progress(11)), "2026-03-01T11:00:00Z", False),
    ("within the deadline", dict(progress=progress(10)), "2026-03-01T11:55:00Z", False),
    ("past the deadline", dict(progress=progress(10)), "2026-03-01T11:49:59Z", True),
    ("bus silent past the deadline", {}, "2026-03-01T11:00:00Z", True),
]


@pytest.mark.parametrize("case,kw,since,expected", STALLS, ids=[s[0] for s in STALLS])
def test_stalled(case, kw, since, expected):
    previous = {**RUNNING, "step": 10, "lastProgressTime": since}
    status = compute_status(obs(spec=STALL_SPEC, learner=learner_job(active=2, ready=2), **kw), previous)
    stalled = next((c for c in status["conditions"] if c["type"] == "Stalled"), None)
    assert (stalled is not None and stalled["status"] == "True") == expected
    assert status["phase"] == "Running"  # failOnStall is off
    if case == "advanced":
        assert status["lastProgressTime"] == "2026-03-01T12:00:00Z"


def test_fail_on_stall_fails_the_job():
    previous = {**RUNNING, "step": 10, "lastProgressTime": "2026-03-01T10:00:00Z"}
    spec = job(progressDeadlineSeconds=600, failOnStall=True).spec
    status = compute_status(obs(spec=spec, learner=learner_job(active=2, ready=2), progress=progress(10)), previous)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert (status["phase"], failed["reason"]) == ("Failed", "ProgressDeadlineExceeded")


def test_kubectl_get_columns_and_scale_status():
    status = compute_status(obs(learner=learner_job(active=2, ready=2), progress=progress(10),
                                generators={"readyReplicas": 2}, generator_selector="a=b"), {})
    assert (status["progress"], status["generators"], status["replicas"], status["selector"]) == ("10/50", "2/3", 2, "a=b")


def test_render_prints_every_child_and_each_example_validates_strictly(capsys):
    from asyncrlhf import cli

    paths = sorted((ROOT / "examples").glob("*.yaml"))
    assert paths
    for path in paths:
        assert cli.main(["render", str(path), "--namespace", "team"]) == 0
        objects = [o for o in yaml.safe_load_all(capsys.readouterr().out) if o]
        expected = plan.desired_children(api.AsyncRLHFJob.model_validate(yaml.safe_load(path.read_text())),
                                         plan.Owner(objects[0]["metadata"]["name"].rsplit("-", 1)[0], "team", ""), NATS)
        assert [o["kind"] for o in objects] == [c["kind"] for c in expected], path
        for obj in objects:
            assert obj["metadata"]["namespace"] == "team" and "ownerReferences" not in obj["metadata"]
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_render_refuses_a_bad_manifest(tmp_path, capsys):
    from asyncrlhf import cli

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "x"},
                                   "spec": {"generator": {"podTemplate": {"spec": {"hostPID": True}}}}}))
    assert cli.main(["render", str(bad)]) == 2
    assert "hostPID" in capsys.readouterr().err


def test_hf_token_twice_is_refused():
    body = {"metadata": {"name": "demo"}, "spec": {"model": {"tokenSecret": {"name": "hf"}}, "learner": {
        "podTemplate": {"spec": {"containers": [{"name": "learner", "env": [{"name": "HF_TOKEN", "value": "x"}]}]}}}}}
    j, error = validate(body)
    assert j is None and error.startswith("spec.learner.podTemplate.spec.containers[0].env[0]: HF_TOKEN comes from")
