"""The real operator (kopf, in-process) against kmock and a real nats-server.

kmock emulates the API server (objects, watch, patch, finalizers) but assigns no uid,
resourceVersion or generation and has no controllers: the emulator below stamps those, and
the tests play the controllers' part (mark the learner Job ready, failed, complete) through
the API, as kubectl would. kmock runs in its own thread and loop, kopf in KopfRunner's, and
the tests talk HTTP to kmock; nothing shares an event loop.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Callable, Optional

import nats
import pytest
from kopf.testing import KopfRunner

from asyncrlhf import api
from asyncrlhf.bus import EmbeddedNats, JobBus
from asyncrlhf.messages import GeneratorStatus, LearnerProgress
from asyncrlhf_operator.handlers import LAST_HANDLED, build_registry
from asyncrlhf_operator.settings import OperatorConfig
from asyncrlhf_operator.validation import IMMUTABLE_ANNOTATION

# The emulator, its resources and the children's paths are shared with bench/operator_bench.py.
# (test_ha_kmock.py and test_kubelet.py import RESOURCES, VERBS and Emulator from here)
from kmock_support import (  # noqa: F401
    CHILDREN, CR, NS, RESOURCES, VERBS, ApiThread, Emulator, eventually, write_kubeconfig,
)

RESYNC = 2.0  # the operator re-applies every child this often (60 s by default)


def run_async(coro):
    return asyncio.run(coro)


async def _js_call(url: str, fn):
    nc = await nats.connect(url)
    try:
        return await fn(nc.jetstream())
    finally:
        await nc.close()


def stream_exists(url: str, job: str) -> bool:
    async def check(js):
        try:
            await js.stream_info(JobBus(NS, job).stream)
            return True
        except nats.js.errors.NotFoundError:
            return False
    return run_async(_js_call(url, check))


def put_kv(url: str, job: str, key: str, value: bytes) -> None:
    async def put(js):
        kv = await js.key_value(JobBus(NS, job).bucket)
        await kv.put(key, value)
    run_async(_js_call(url, put))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """kmock + nats-server + the operator; yields (api, nats_url)."""
    with EmbeddedNats() as bus, ApiThread() as kube:
        kubeconfig = tmp_path_factory.mktemp("kube") / "config"
        write_kubeconfig(kubeconfig, kube.url)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("KUBECONFIG", str(kubeconfig))
            # The client library reads $KUBECONFIG once, when first imported.
            mp.setattr("kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
            mp.delenv("KUBERNETES_SERVICE_HOST", raising=False)
            registry = build_registry(OperatorConfig(nats_url=bus.url, status_interval=0.5,
                                                     resync_interval=RESYNC))
            with KopfRunner(["run", "-A", "--standalone"], registry=registry, timeout=30) as runner:
                yield kube, bus.url
        assert runner.exception is None, runner.output


_created: list[str] = []


@pytest.fixture(autouse=True)
def delete_jobs_afterwards(cluster):
    """Each test's jobs go away after it, so their timers do not slow the next tests down."""
    yield
    kube, _ = cluster
    while _created:
        kube.call("DELETE", f"{CR}/{_created.pop()}")


def create_job(kube: ApiThread, name: str, **spec: Any) -> dict[str, Any]:
    _created.append(name)
    body = {"apiVersion": api.API_VERSION, "kind": api.KIND,
            "metadata": {"name": name, "namespace": NS}, "spec": spec}
    return kube.call("POST", CR, body)


def job_status(kube: ApiThread, name: str) -> dict[str, Any]:
    return (kube.get(f"{CR}/{name}") or {}).get("status") or {}


def children_of(kube: ApiThread, name: str) -> dict[str, Optional[dict]]:
    return {kind: kube.get(path.format(name)) for kind, path in CHILDREN.items()}


def mark_learner(kube: ApiThread, name: str, status: dict[str, Any]) -> None:
    kube.call("PATCH", CHILDREN["Job"].format(name) + "/status", {"status": status})


def replicas(kube: ApiThread, name: str) -> Optional[int]:
    deployment = kube.get(CHILDREN["Deployment"].format(name))
    return deployment["spec"]["replicas"] if deployment else None


def handled(kube: ApiThread, name: str, check: Callable[[dict[str, Any]], bool]) -> None:
    """Wait until the operator's handlers have completed for a spec that passes `check`: kopf
    records that spec on the job (its diff base) once they all succeeded."""
    def done() -> bool:
        annotations = ((kube.get(f"{CR}/{name}") or {}).get("metadata") or {}).get("annotations") or {}
        return LAST_HANDLED in annotations and check(json.loads(annotations[LAST_HANDLED]).get("spec") or {})
    eventually(done, what=f"the handlers of {name} done")


def a_status_pass(kube: ApiThread, name: str) -> None:
    """Wait for one more pass of the status timer over a job it writes the status of: every pass
    writes observedGeneration, so set it to 0 and wait for it to come back."""
    generation = kube.get(f"{CR}/{name}")["metadata"]["generation"]
    kube.call("PATCH", f"{CR}/{name}/status", {"status": {"observedGeneration": 0}})
    eventually(lambda: job_status(kube, name).get("observedGeneration") == generation,
               what=f"a status pass over {name}")


def status_passes_for(kube: ApiThread, name: str, seconds: float) -> None:
    """Status passes over the job, each one waited for, until `seconds` have gone by (e.g. long
    enough that a resync, due every RESYNC seconds, would have happened)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        a_status_pass(kube, name)


def strip_versions(obj: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in obj["metadata"].items() if k != "resourceVersion"}
    return {**obj, "metadata": meta}


# ---------------------------------------------------------------------------------------------


def test_create_makes_children_and_stream(cluster):
    kube, url = cluster
    created = create_job(kube, "alpha", generator={"replicas": 2})
    found = eventually(lambda: all(children_of(kube, "alpha").values()) and children_of(kube, "alpha"),
                       what="all children")
    for kind, child in found.items():
        owners = child["metadata"].get("ownerReferences", [])
        if kind == "PersistentVolumeClaim":  # retained by default: no owner
            assert owners == []
        else:
            assert owners[0]["uid"] == created["metadata"]["uid"] and owners[0]["kind"] == api.KIND
    assert found["Deployment"]["spec"]["replicas"] == 2
    assert found["Job"]["spec"]["completionMode"] == "Indexed"
    assert stream_exists(url, "alpha")
    assert eventually(lambda: job_status(kube, "alpha").get("phase") == "Pending", what="Pending")


def test_progress_on_the_bus_reaches_status(cluster):
    kube, url = cluster
    create_job(kube, "beta")
    eventually(lambda: kube.get(CHILDREN["Job"].format("beta")), what="learner Job")
    mark_learner(kube, "beta", {"active": 1, "ready": 1})
    put_kv(url, "beta", "learner", LearnerProgress(
        step=7, total_steps=100, policy_version=7, rollouts_consumed=112, staleness_mean=0.5,
        staleness_max=1, reward_mean=0.75).encode())
    put_kv(url, "beta", "generator.beta-generator-x", GeneratorStatus(
        generator_id="beta-generator-x", policy_version=6, rollouts=40, tokens_per_second=123.0).encode())
    # One status pass may have read the Job before it was marked active and the bus after the put;
    # the next pass (every 0.5 s) sees both, so wait for the two together.
    status = eventually(lambda: (s := job_status(kube, "beta")).get("step") == 7
                        and s.get("phase") == "Running" and s, what="step 7 and Running in status")
    assert status["policyVersion"] == 7
    assert status["rewardMean"] == 0.75 and status["generatorVersions"] == {"beta-generator-x": 6}
    assert status["rolloutsProduced"] == 40 and status["tokensPerSecond"] == 123.0
    assert {c["type"] for c in status["conditions"]} >= {"Ready", "Progressing", "Suspended"}

    def reasons() -> set[str]:  # kopf posts events from a queue, a moment after the status patch
        events = kube.get("/api/v1/namespaces/default/events") or {"items": []}
        return {e.get("reason") for e in events["items"]
                if (e.get("involvedObject") or {}).get("name") == "beta"}
    eventually(lambda: "Running" in reasons(), what="a Running event")


def test_replicas_change_touches_only_the_deployment(cluster):
    kube, _ = cluster
    create_job(kube, "gamma", generator={"replicas": 1})
    eventually(lambda: all(children_of(kube, "gamma").values()), what="children")
    handled(kube, "gamma", lambda spec: spec["generator"]["replicas"] == 1)  # the create handler is done
    before = {k: strip_versions(v) for k, v in children_of(kube, "gamma").items()}
    kube.call("PATCH", f"{CR}/gamma", {"spec": {"generator": {"replicas": 4}}})
    eventually(lambda: replicas(kube, "gamma") == 4,
               what="4 replicas")
    handled(kube, "gamma", lambda spec: spec["generator"]["replicas"] == 4)  # and the update handler
    after = {k: strip_versions(v) for k, v in children_of(kube, "gamma").items()}
    changed = {kind for kind in before if before[kind] != after[kind]}
    assert changed == {"Deployment"}


def test_children_deleted_or_edited_by_hand_come_back(cluster):
    kube, url = cluster
    create_job(kube, "iota", generator={"replicas": 2})
    original = eventually(lambda: all(children_of(kube, "iota").values()) and children_of(kube, "iota"),
                          what="children")
    deleted = ("Deployment", "ConfigMap", "NetworkPolicy", "ServiceAccount")
    for kind in deleted:
        kube.call("DELETE", CHILDREN[kind].format("iota"))
    kube.call("PATCH", CHILDREN["Service"].format("iota"), {"spec": {"clusterIP": "10.0.0.1"}})
    run_async(_js_call(url, lambda js: js.delete_stream(JobBus(NS, "iota").stream)))
    uid = {kind: original[kind]["metadata"]["uid"] for kind in deleted}
    restored = eventually(lambda: (c := children_of(kube, "iota")) and all(c.values())
                          and all(c[kind]["metadata"]["uid"] != uid[kind] for kind in deleted)
                          and c["Service"]["spec"].get("clusterIP") == "None" and c,
                          timeout=4 * RESYNC + 10, what="children re-created and re-applied at the resync")
    assert restored["Deployment"]["spec"] == original["Deployment"]["spec"]
    assert restored["ConfigMap"]["data"] == original["ConfigMap"]["data"]
    assert eventually(lambda: stream_exists(url, "iota"), what="the stream again")


def test_suspend_scales_to_zero_and_keeps_the_stream(cluster):
    kube, url = cluster
    create_job(kube, "delta", generator={"replicas": 3})
    eventually(lambda: kube.get(CHILDREN["Deployment"].format("delta")), what="Deployment")
    kube.call("PATCH", f"{CR}/delta", {"spec": {"suspend": True}})
    eventually(lambda: replicas(kube, "delta") == 0,
               what="0 replicas")
    assert kube.get(CHILDREN["Job"].format("delta"))["spec"]["suspend"] is True
    assert eventually(lambda: job_status(kube, "delta").get("phase") == "Suspended", what="Suspended")
    assert stream_exists(url, "delta") and kube.get(CHILDREN["PersistentVolumeClaim"].format("delta"))
    kube.call("PATCH", f"{CR}/delta", {"spec": {"suspend": False}})
    eventually(lambda: replicas(kube, "delta") == 3,
               what="3 replicas again")
    assert kube.get(CHILDREN["Job"].format("delta"))["spec"]["suspend"] is False


def test_failed_learner_is_restarted_then_the_job_fails(cluster):
    kube, _ = cluster
    create_job(kube, "epsilon", learner={"backoffLimit": 1})
    job_path = CHILDREN["Job"].format("epsilon")
    first = eventually(lambda: kube.get(job_path), what="learner Job")
    failed = {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "PodFailed",
                                           "message": "learner exited with code 1"}]}
    mark_learner(kube, "epsilon", failed)
    second = eventually(lambda: (j := kube.get(job_path)) and j["metadata"]["uid"] != first["metadata"]["uid"]
                        and j, what="a recreated learner Job")
    assert "status" not in second or not second["status"].get("conditions")
    assert eventually(lambda: job_status(kube, "epsilon").get("restarts") == 1, what="1 restart")
    mark_learner(kube, "epsilon", failed)
    status = eventually(lambda: job_status(kube, "epsilon").get("phase") == "Failed" and
                        job_status(kube, "epsilon"), what="Failed")
    reason = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert reason["reason"] == "BackoffLimitExceeded" and "exited with code 1" in reason["message"]
    # the pass after Failed stops the generators; it is also where a third learner would come from
    eventually(lambda: replicas(kube, "epsilon") == 0, what="the generators stopped after Failed")
    assert kube.get(job_path)["metadata"]["uid"] == second["metadata"]["uid"]  # no third learner


def test_invalid_spec_fails_naming_the_field(cluster):
    kube, url = cluster
    # kmock does not run the CRD's CEL rules, so this reaches the operator (as with an old CRD).
    create_job(kube, "zeta", algorithm={"samplesPerPrompt": 1})
    status = eventually(lambda: job_status(kube, "zeta").get("phase") == "Failed" and job_status(kube, "zeta"),
                        what="Failed")
    invalid = next(c for c in status["conditions"] if c["type"] == "SpecInvalid")
    assert invalid["status"] == "True" and invalid["message"].startswith("spec.algorithm.samplesPerPrompt:")
    assert kube.get(CHILDREN["Deployment"].format("zeta")) is None and not stream_exists(url, "zeta")


def test_a_changed_immutable_field_fails_the_job_until_it_is_set_back(cluster):
    kube, _ = cluster
    # kmock does not run the CRD's transition rules (`self == oldSelf`): the operator's check answers
    create_job(kube, "kappa", model={"policy": "builtin:tiny-sort"})
    job_path = CHILDREN["Job"].format("kappa")
    learner = eventually(lambda: kube.get(job_path), what="learner Job")
    eventually(lambda: IMMUTABLE_ANNOTATION in (kube.get(f"{CR}/kappa")["metadata"].get("annotations") or {}),
               what="the immutable fields recorded")
    kube.call("PATCH", f"{CR}/kappa", {"spec": {"model": {"policy": "org/other-model"}}})
    status = eventually(lambda: (s := job_status(kube, "kappa")).get("phase") == "Failed" and s, what="Failed")
    invalid = next(c for c in status["conditions"] if c["type"] == "SpecInvalid")
    assert invalid["status"] == "True" and invalid["message"].startswith("spec.model.policy: is immutable")
    handled(kube, "kappa", lambda spec: spec["model"]["policy"] == "org/other-model")
    status_passes_for(kube, "kappa", 2 * RESYNC)  # neither the update nor a resync replaced the learner
    assert kube.get(job_path)["metadata"]["uid"] == learner["metadata"]["uid"]
    kube.call("PATCH", f"{CR}/kappa", {"spec": {"model": {"policy": "builtin:tiny-sort"}}})
    assert eventually(lambda: job_status(kube, "kappa").get("phase") == "Pending", what=f"Pending again")
    assert kube.get(job_path)["metadata"]["uid"] == learner["metadata"]["uid"]


def test_volume_snapshots_are_taken_every_n_steps_and_the_oldest_deleted(cluster):
    kube, url = cluster
    create_job(kube, "lambda", weightSync={"volumeSnapshots": {"enabled": True, "everySteps": 10, "keep": 2,
                                                               "className": "csi-snap"}})
    eventually(lambda: kube.get(CHILDREN["Job"].format("lambda")), what="learner Job")
    snapshot = "/apis/snapshot.storage.k8s.io/v1/namespaces/default/volumesnapshots/{}"

    def at_step(step: int) -> None:
        put_kv(url, "lambda", "learner", LearnerProgress(step=step, total_steps=100, policy_version=step).encode())
        eventually(lambda: job_status(kube, "lambda").get("step") == step, what=f"step {step} in status")

    at_step(5)
    a_status_pass(kube, "lambda")  # a later pass at step 5 took none either
    assert job_status(kube, "lambda").get("volumeSnapshots") == []
    for step, kept in ((12, ["lambda-step-10"]), (27, ["lambda-step-10", "lambda-step-20"]),
                       (31, ["lambda-step-20", "lambda-step-30"])):
        at_step(step)
        eventually(lambda: job_status(kube, "lambda").get("volumeSnapshots") == kept, what=f"{kept}")
        for name in kept:
            taken = kube.get(snapshot.format(name))
            assert taken["spec"] == {"source": {"persistentVolumeClaimName": "lambda-snapshots"},
                                     "volumeSnapshotClassName": "csi-snap"}
    assert eventually(lambda: kube.get(snapshot.format("lambda-step-10")) is None, what="the oldest deleted")


def test_delete_removes_the_stream(cluster):
    kube, url = cluster
    create_job(kube, "eta", weightSync={"retainVolume": False})
    eventually(lambda: stream_exists(url, "eta") and kube.get(CHILDREN["PersistentVolumeClaim"].format("eta")),
               what="stream and PVC")
    eventually(lambda: f"{api.GROUP}/cleanup" in kube.get(f"{CR}/eta")["metadata"].get("finalizers", []),
               what="finalizer")
    kube.call("DELETE", f"{CR}/eta")
    eventually(lambda: kube.get(f"{CR}/eta") is None, what="the job gone")
    assert not stream_exists(url, "eta")
    assert kube.get(CHILDREN["PersistentVolumeClaim"].format("eta")) is None


def test_finished_job_stops_generators_and_expires(cluster):
    kube, url = cluster
    create_job(kube, "theta", generator={"replicas": 2}, ttlSecondsAfterFinished=2)
    eventually(lambda: kube.get(CHILDREN["Job"].format("theta")), what="learner Job")
    mark_learner(kube, "theta", {"succeeded": 1, "conditions": [
        {"type": "Complete", "status": "True", "reason": "CompletionsReached", "message": ""}]})
    eventually(lambda: job_status(kube, "theta").get("phase") == "Succeeded", what="Succeeded")
    eventually(lambda: replicas(kube, "theta") == 0,
               what="generators stopped")
    eventually(lambda: kube.get(f"{CR}/theta") is None, what="the job deleted after its TTL")
    assert not stream_exists(url, "theta")


def test_metrics_count_reconciles_and_phases(cluster):
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("asyncrlhf_operator_reconciles_total", {"handler": "reconcile"}) >= 1
    assert REGISTRY.get_sample_value("asyncrlhf_operator_reconciles_total", {"handler": "status"}) >= 1
    assert REGISTRY.get_sample_value("asyncrlhf_operator_reconciles_total", {"handler": "delete"}) >= 1
    assert REGISTRY.get_sample_value("asyncrlhf_operator_errors_total", {"handler": "status"}) is not None
    assert REGISTRY.get_sample_value("asyncrlhf_operator_jobs", {"phase": "Failed"}) is not None


# --- pods that fit real clusters, failures you can see ----------------------------------------


def pod_template_of(kube: ApiThread, kind: str, name: str) -> dict[str, Any]:
    return kube.get(CHILDREN[kind].format(name))["spec"]["template"]


def test_a_pod_template_reaches_the_pods_of_both_workloads(cluster):
    kube, _ = cluster
    template = {"metadata": {"labels": {"team": "rl"}, "annotations": {"cost-center": "42"}},
                "spec": {"nodeSelector": {"pool": "h100"},
                         "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "rl", "effect": "NoSchedule"}],
                         "containers": [{"name": "generator", "envFrom": [{"secretRef": {"name": "wandb"}}],
                                         "env": [{"name": "WANDB_MODE", "value": "offline"}]}]}}
    learner = {"spec": {"nodeSelector": {"pool": "h100"},
                        "containers": [{"name": "learner", "envFrom": [{"secretRef": {"name": "wandb"}}]}]}}
    create_job(kube, "mu", generator={"resources": {"gpus": 1}, "podTemplate": template},
               learner={"podTemplate": learner}, model={"tokenSecret": {"name": "hf", "key": "token"}})
    eventually(lambda: kube.get(CHILDREN["Deployment"].format("mu")) and kube.get(CHILDREN["Job"].format("mu")),
               what="the workloads")
    generator = pod_template_of(kube, "Deployment", "mu")
    assert generator["metadata"]["labels"]["team"] == "rl"
    assert generator["metadata"]["labels"]["app.kubernetes.io/component"] == "generator"
    assert generator["metadata"]["annotations"]["cost-center"] == "42"
    pod = generator["spec"]
    assert pod["nodeSelector"] == {"pool": "h100"}
    assert [t["key"] for t in pod["tolerations"]] == ["nvidia.com/gpu", "dedicated"]  # appended, GPU kept
    (container,) = pod["containers"]
    assert container["envFrom"] == [{"secretRef": {"name": "wandb"}}]
    env = {e["name"]: e for e in container["env"]}
    assert env["WANDB_MODE"]["value"] == "offline" and "ASYNCRLHF_NATS_URL" in env
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert container["args"][0] == "generator"  # the operator's command survives the merge
    assert kube.get(CHILDREN["Deployment"].format("mu"))["spec"]["strategy"] == {"type": "Recreate"}
    learner_pod = pod_template_of(kube, "Job", "mu")["spec"]
    assert learner_pod["nodeSelector"] == {"pool": "h100"} and learner_pod["restartPolicy"] == "Never"
    assert learner_pod["containers"][0]["envFrom"] == [{"secretRef": {"name": "wandb"}}]


def test_a_pod_template_that_overrides_what_the_operator_owns_is_refused(cluster):
    kube, _ = cluster
    create_job(kube, "nu", generator={"podTemplate": {"spec": {"containers": [
        {"name": "generator", "command": ["sleep"], "env": [{"name": "ASYNCRLHF_NATS_URL", "value": "nats://evil"}]}]}}})
    status = eventually(lambda: (s := job_status(kube, "nu")).get("phase") == "Failed" and s, what="Failed")
    invalid = next(c for c in status["conditions"] if c["type"] == "SpecInvalid")
    assert invalid["message"].startswith("spec.generator.podTemplate.spec: containers[0].command: owned by the operator")
    assert "ASYNCRLHF_NATS_URL is set by the operator" in invalid["message"]
    assert kube.get(CHILDREN["Deployment"].format("nu")) is None


def events_of(kube: ApiThread, name: str) -> list[dict[str, Any]]:
    events = kube.get("/api/v1/namespaces/default/events") or {"items": []}
    return [e for e in events["items"] if (e.get("involvedObject") or {}).get("name") == name]


def test_a_crash_looping_generator_becomes_a_condition_and_an_event(cluster):
    kube, _ = cluster
    create_job(kube, "xi", generator={"replicas": 1})
    eventually(lambda: kube.get(CHILDREN["Job"].format("xi")), what="learner Job")
    mark_learner(kube, "xi", {"active": 1, "ready": 1})
    labels = {"app.kubernetes.io/name": "asyncrlhf", "app.kubernetes.io/instance": "xi",
              "app.kubernetes.io/component": "generator"}
    kube.call("POST", "/api/v1/namespaces/default/pods", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "xi-generator-abc", "labels": labels},
        "spec": {"containers": [{"name": "generator", "image": "x"}]},
        "status": {"phase": "Running", "containerStatuses": [{
            "name": "generator", "ready": False, "restartCount": 4,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting"}},
            "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}]}})
    status = eventually(lambda: (s := job_status(kube, "xi")) and any(
        c["type"] == "Ready" and c["reason"] == "OOMKilled" for c in s.get("conditions", [])) and s,
        what="Ready False with reason OOMKilled")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and "xi-generator-abc" in ready["message"] and "exit code 137" in ready["message"]
    event = eventually(lambda: next((e for e in events_of(kube, "xi") if e.get("reason") == "OOMKilled"), None),
                       what="an OOMKilled event")
    assert event["type"] == "Warning" and "resources.memory" in event["message"]
    kube.call("DELETE", "/api/v1/namespaces/default/pods/xi-generator-abc")


def test_a_job_whose_step_does_not_advance_is_stalled_and_fails_when_asked(cluster):
    kube, url = cluster
    create_job(kube, "omicron", progressDeadlineSeconds=600, failOnStall=True)
    eventually(lambda: kube.get(CHILDREN["Job"].format("omicron")), what="learner Job")
    mark_learner(kube, "omicron", {"active": 1, "ready": 1})
    put_kv(url, "omicron", "learner", LearnerProgress(step=7, total_steps=100, policy_version=7).encode())
    status = eventually(lambda: (s := job_status(kube, "omicron")).get("step") == 7 and s.get("phase") == "Running"
                        and s, what="Running at step 7")
    assert status["progress"] == "7/100" and status["lastProgressTime"]
    assert not any(c["type"] == "Stalled" for c in status["conditions"])
    # the step last advanced 11 minutes ago (past the 600 s deadline), and it is still 7
    kube.call("PATCH", f"{CR}/omicron/status", {"status": {"lastProgressTime": "2020-01-01T00:00:00Z"}})
    status = eventually(lambda: (s := job_status(kube, "omicron")).get("phase") == "Failed" and s, what="Failed")
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert failed["reason"] == stalled["reason"] == "ProgressDeadlineExceeded" and stalled["status"] == "True"
    assert "step has not advanced from 7" in failed["message"]


def test_kubectl_scale_through_the_subresource_reaches_the_generators(cluster):
    kube, _ = cluster
    create_job(kube, "pi", generator={"replicas": 1})
    eventually(lambda: replicas(kube, "pi") == 1, what="1 replica")
    # what the apiserver does for `kubectl scale arj/pi --replicas=3` (specReplicasPath in the CRD)
    kube.call("PATCH", f"{CR}/pi", {"spec": {"generator": {"replicas": 3}}})
    eventually(lambda: replicas(kube, "pi") == 3, what="3 replicas")
    kube.call("PATCH", CHILDREN["Deployment"].format("pi") + "/status", {"status": {"readyReplicas": 2}})
    status = eventually(lambda: (s := job_status(kube, "pi")).get("generators") == "2/3" and s,
                        what="generators 2/3 in status")
    assert status["replicas"] == 2
    assert status["selector"] == ("app.kubernetes.io/name=asyncrlhf,app.kubernetes.io/instance=pi,"
                                  "app.kubernetes.io/component=generator")


# --- Kueue gang admission ------------------------------------------------------------------------
# kmock runs no Kueue: the test writes the Workload's status as Kueue's scheduler would (quota
# reserved and admitted, then Evicted on preemption) and plays the Job controller's part (no pod
# active after a suspension). What Kueue itself decides (quota, flavors, preemption) is not here.

WORKLOAD = "/apis/kueue.x-k8s.io/v1beta1/namespaces/default/workloads/asyncrlhfjob-{}"
QUEUE = {"kueue.x-k8s.io/queue-name": "gpu-queue"}


def create_queued_job(kube: ApiThread, name: str, **spec: Any) -> dict[str, Any]:
    _created.append(name)
    return kube.call("POST", CR, {"apiVersion": api.API_VERSION, "kind": api.KIND,
                                  "metadata": {"name": name, "namespace": NS, "labels": QUEUE}, "spec": spec})


def kueue_condition(kind: str, status: str, reason: str, message: str = "") -> dict[str, Any]:
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2026-03-01T12:00:00Z"}


def admit(kube: ApiThread, name: str, generators: int) -> None:
    """What Kueue writes when it admits the Workload: the assignment and the conditions."""
    assignments = [{"name": "learner", "count": 1, "flavors": {"cpu": "default"}},
                   {"name": "generator", "count": generators, "flavors": {"cpu": "default"}}]
    kube.call("PATCH", WORKLOAD.format(name) + "/status", {"status": {
        "admission": {"clusterQueue": "cluster-gpus", "podSetAssignments": assignments},
        "conditions": [kueue_condition("QuotaReserved", "True", "QuotaReserved"),
                       kueue_condition("Admitted", "True", "Admitted"),
                       kueue_condition("Evicted", "False", "QuotaReserved")]}})


def evict(kube: ApiThread, name: str) -> None:
    """What Kueue writes when it preempts an admitted Workload (the admission stays until the job stopped)."""
    conditions = kube.get(WORKLOAD.format(name))["status"]["conditions"]
    conditions = [c for c in conditions if c["type"] != "Evicted"] + [
        kueue_condition("Evicted", "True", "Preempted", "Preempted to accommodate a higher priority Workload")]
    kube.call("PATCH", WORKLOAD.format(name) + "/status", {"status": {"conditions": conditions}})


def workloads_of(kube: ApiThread, name: str) -> tuple[Optional[bool], Optional[int]]:
    """(learner Job suspended, generator replicas); None for what does not exist (yet)."""
    learner = kube.get(CHILDREN["Job"].format(name))
    return (learner["spec"]["suspend"] if learner else None), replicas(kube, name)


def test_kueue_admits_learner_and_generators_together_and_preemption_suspends_them(cluster):
    kube, _ = cluster
    create_queued_job(kube, "rho", generator={"replicas": 2})
    workload = eventually(lambda: kube.get(WORKLOAD.format("rho")), what="the Workload")
    assert workload["spec"]["queueName"] == "gpu-queue"
    assert [(p["name"], p["count"]) for p in workload["spec"]["podSets"]] == [("learner", 1), ("generator", 2)]
    # before admission: the children exist, nothing runs, through status passes and resyncs
    eventually(lambda: all(children_of(kube, "rho").values()), what="children")
    status = eventually(lambda: (s := job_status(kube, "rho")).get("phase") == "Suspended" and s, what="Suspended")
    assert next(c for c in status["conditions"] if c["type"] == "Suspended")["reason"] == "WaitingForAdmission"
    status_passes_for(kube, "rho", RESYNC + 0.5)
    assert workloads_of(kube, "rho") == (True, 0)
    learner_uid = kube.get(CHILDREN["Job"].format("rho"))["metadata"]["uid"]

    admit(kube, "rho", generators=2)
    eventually(lambda: workloads_of(kube, "rho") == (False, 2), what="learner and 2 generators started")
    mark_learner(kube, "rho", {"active": 1, "ready": 1})
    eventually(lambda: job_status(kube, "rho").get("phase") == "Running", what="Running")

    evict(kube, "rho")
    eventually(lambda: workloads_of(kube, "rho") == (True, 0), what="learner and generators stopped")
    status = eventually(lambda: (s := job_status(kube, "rho")).get("phase") == "Suspended" and s, what="Suspended")
    assert next(c for c in status["conditions"] if c["type"] == "Suspended")["reason"] == "Evicted"
    a_status_pass(kube, "rho")  # the learner pod is still active: the admission is kept meanwhile
    assert kube.get(WORKLOAD.format("rho"))["status"].get("admission")
    mark_learner(kube, "rho", {"active": 0, "ready": 0})  # the Job controller deleted the pod
    released = eventually(lambda: (w := kube.get(WORKLOAD.format("rho")))["status"].get("admission") is None and w,
                          what="the admission cleared for Kueue to requeue")
    conditions = {c["type"]: c for c in released["status"]["conditions"]}
    assert (conditions["QuotaReserved"]["status"], conditions["Requeued"]["status"]) == ("False", "True")
    # the operator never resumes on its own: passes and a resync later, still stopped
    status_passes_for(kube, "rho", RESYNC + 0.5)
    assert workloads_of(kube, "rho") == (True, 0)

    admit(kube, "rho", generators=2)  # admitted again: the same learner Job resumes (its checkpoint)
    eventually(lambda: workloads_of(kube, "rho") == (False, 2), what="resumed")
    assert kube.get(CHILDREN["Job"].format("rho"))["metadata"]["uid"] == learner_uid


def test_kueue_scale_within_the_admission_and_beyond_it(cluster):
    kube, _ = cluster
    create_queued_job(kube, "sigma", generator={"replicas": 2})
    first = eventually(lambda: kube.get(WORKLOAD.format("sigma")), what="the Workload")
    admit(kube, "sigma", generators=2)
    eventually(lambda: workloads_of(kube, "sigma") == (False, 2), what="running")
    kube.call("PATCH", f"{CR}/sigma", {"spec": {"generator": {"replicas": 1}}})  # kubectl scale --replicas=1
    eventually(lambda: replicas(kube, "sigma") == 1, what="1 generator")
    assert kube.get(WORKLOAD.format("sigma"))["metadata"]["uid"] == first["metadata"]["uid"]  # no requeue
    kube.call("PATCH", f"{CR}/sigma", {"spec": {"generator": {"replicas": 4}}})  # more than admitted
    second = eventually(lambda: (w := kube.get(WORKLOAD.format("sigma"))) and w["metadata"]["uid"] !=
                        first["metadata"]["uid"] and w, what="a new Workload for 4 generators")
    assert [p["count"] for p in second["spec"]["podSets"]] == [1, 4]
    eventually(lambda: workloads_of(kube, "sigma") == (True, 0), what="held until the new one is admitted")
    admit(kube, "sigma", generators=4)
    eventually(lambda: workloads_of(kube, "sigma") == (False, 4), what="4 generators")
    mark_learner(kube, "sigma", {"succeeded": 1, "conditions": [
        {"type": "Complete", "status": "True", "reason": "CompletionsReached", "message": ""}]})
    eventually(lambda: kube.get(WORKLOAD.format("sigma")) is None, what="the quota given back when finished")
