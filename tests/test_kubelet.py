"""The operator's pods, run for real: `kubectl apply` -> operator -> pods as processes -> `kubectl get arj`.

kmock serves the API, the real operator (kopf, in-process) reconciles the job, the process
kubelet (`tests/kubelet.py`, which says what it emulates and what it cannot) runs every pod the
operator creates from its own pod spec, and a real nats-server with a user and password (as the
chart's NATS has) carries the bus: so the operator and every pod must get the credentials from
the Secret the chart would create, through the operator's secretKeyRefs.

The jobs are `examples/local-tiny.yaml` with the HF engine (no vLLM start), 4 prompts a step and
few steps, to keep both tests to a few minutes on 2 cores.

kubectl: the real binary (tests/helm_tools.py) runs `kubectl apply -f` and `kubectl get arj`
against kmock. kmock serves no OpenAPI document (`GET /openapi/v3`, `/openapi/v2`: 404), which
kubectl's client validation downloads first: `apply` runs with `--validate=false` (the manifest
is checked against the CRD schema in tests/test_crd.py); `KubectlEmulator` below fixes three
answers kmock gets wrong for kubectl. kmock does not answer `Accept: application/json;as=Table` with a Table, which is
how kubectl gets a custom resource's printer columns from the apiserver; the table is printed
with `-o custom-columns` built from the CRD's own additionalPrinterColumns instead (same
columns, same JSONPaths, rendered by kubectl).
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import nats
import pytest
import yaml
from kopf.testing import KopfRunner

import kmock
from asyncrlhf import api, workload_env
from asyncrlhf.bus import EmbeddedNats, JobBus
from asyncrlhf_operator.handlers import build_registry
from asyncrlhf_operator.settings import OperatorConfig
from helm_tools import ToolUnavailable, kubectl_binary
from kubelet import Kubelet
from test_operator_kmock import RESOURCES, VERBS, ApiThread, Emulator

pytestmark = [pytest.mark.kubelet, pytest.mark.slow]

NS = "default"
REPO = Path(__file__).resolve().parent.parent
CRD = REPO / "crds" / "asyncrlhf.dev_asyncrlhfjobs.yaml"
CR = f"/apis/{api.GROUP}/{api.VERSION}/namespaces/{NS}/{api.PLURAL}"
NATS_USER, NATS_PASSWORD = "asyncrlhf", "Kp4ssw0rdFromTheChart"


class KubectlEmulator(Emulator):
    """kmock 0.8 plus three answers kubectl needs and an apiserver gives: `GET /api/v1` names its
    group version "v1" (kmock: "/v1", and kubectl's REST mapper then finds no core kinds: "no
    matches for kind Secret in version v1"); a list has `kind: <Kind>List` and `apiVersion`
    (kmock: neither, and kubectl refuses it: "Object 'Kind' is missing"); short names belong to
    the resource, not to its subresources (kmock repeats them on `asyncrlhfjobs/status`)."""

    async def _serve_version(self, request):
        payload = await super()._serve_version(request)
        resources = [{**r, "shortNames": []} if "/" in r["name"] else r for r in payload["resources"]]
        return {**payload, "groupVersion": payload["groupVersion"].lstrip("/"), "resources": resources}

    async def _serve_list(self, request):
        payload = await super()._serve_list(request)
        info, resource = self.resources[request.resource], request.resource
        version = f"{resource.group}/{resource.version}" if resource.group else resource.version
        return {"apiVersion": version, "kind": f"{info.kind}List", **payload}


class KubeApi(ApiThread):
    """kmock with the resources the operator uses, `arj` as the short name kubectl resolves."""

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with KubectlEmulator() as emulator, kmock.Server(emulator) as server:
            for key, info in RESOURCES.items():
                emulator.resources[key] = kmock.ResourceInfo(
                    verbs=VERBS, namespaced=info.get("namespaced", True), kind=info["kind"],
                    subresources=info.get("subresources", []),
                    shortnames=["arj"] if info["kind"] == api.KIND else [],
                    singular=api.KIND.lower() if info["kind"] == api.KIND else None)
            emulator.objects["v1/namespaces", None, NS] = {
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()


def auth_nats(store: Path) -> EmbeddedNats:
    """A real nats-server with JetStream that requires a user and password, like the chart's."""
    return EmbeddedNats(store, extra_args=["--user", NATS_USER, "--pass", NATS_PASSWORD])


class Cluster:
    def __init__(self, kube: KubeApi, bus: EmbeddedNats, kubelet: Kubelet, kubeconfig: Path) -> None:
        self.kube, self.bus, self.kubelet, self.kubeconfig = kube, bus, kubelet, kubeconfig

    def kubectl(self, *args: str, stdin: Optional[str] = None) -> str:
        try:
            binary = kubectl_binary()
        except ToolUnavailable as err:
            pytest.skip(str(err))
        out = subprocess.run([str(binary), "--kubeconfig", str(self.kubeconfig), *args], input=stdin,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"kubectl {' '.join(args)}: {out.stderr}"
        return out.stdout

    def status(self, name: str) -> dict[str, Any]:
        return (self.kube.get(f"{CR}/{name}") or {}).get("status") or {}

    def wait(self, check, what: str, timeout: float = 240.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.kubelet.tail()}")
            time.sleep(0.2)

    def progress(self, name: str) -> dict[str, Any]:
        """The learner's progress as it wrote it to the job's KV bucket (fresher than .status)."""
        async def read() -> dict[str, Any]:
            nc = await nats.connect(self.bus.url, user=NATS_USER, password=NATS_PASSWORD)
            try:
                kv = await nc.jetstream().key_value(JobBus(NS, name).bucket)
                return json.loads((await kv.get("learner")).value)
            except Exception:
                return {}
            finally:
                await nc.close()
        return asyncio.run(read())

    def stream_exists(self, name: str) -> bool:
        async def check() -> bool:
            nc = await nats.connect(self.bus.url, user=NATS_USER, password=NATS_PASSWORD)
            try:
                await nc.jetstream().stream_info(JobBus(NS, name).stream)
                return True
            except nats.js.errors.NotFoundError:
                return False
            finally:
                await nc.close()
        return asyncio.run(check())

    def print_table(self) -> str:
        columns = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["additionalPrinterColumns"]
        spec = ",".join(["NAME:.metadata.name"] + [f"{c['name'].upper()}:{c['jsonPath']}" for c in columns])
        table = self.kubectl("get", "arj", "-n", NS, "-o", f"custom-columns={spec}")
        show(f"\n$ kubectl get arj\n{table}")
        return table


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("kubelet")
    with auth_nats(root / "nats") as bus, KubeApi() as kube:
        kubeconfig = root / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": kube.url}}],
            "users": [{"name": "kmock", "user": {}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": NS}}],
        }))
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("KUBECONFIG", str(kubeconfig))
            mp.setattr("kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
            mp.delenv("KUBERNETES_SERVICE_HOST", raising=False)
            registry = build_registry(OperatorConfig(nats_url=bus.url, status_interval=1.0, resync_interval=60.0))
            with KopfRunner(["run", "-A", "--standalone"], registry=registry, timeout=60) as runner, \
                    Kubelet(kube.url, root / "node") as kubelet:
                yield Cluster(kube, bus, kubelet, kubeconfig)
                assert not kubelet.errors, kubelet.errors[-1]
        assert runner.exception is None, runner.output


def show(text: str) -> None:
    """Print to the test's output: KopfRunner (click's CliRunner) swaps sys.stdout while the
    operator runs, so a plain print() would land in the operator's captured output."""
    print(text, file=sys.__stdout__, flush=True)


def manifest(name: str, steps: int, **spec: Any) -> dict[str, Any]:
    """examples/local-tiny.yaml with the HF engine, 4 prompts a step and `steps` steps."""
    job = yaml.safe_load((REPO / "examples" / "local-tiny.yaml").read_text())
    job["metadata"] = {"name": name, "namespace": NS}
    job["spec"]["generator"]["engine"] = "hf"
    job["spec"]["learner"].update(promptsPerStep=4, totalSteps=steps)
    for key, value in spec.items():
        job["spec"].setdefault(key, {}).update(value)
    return job


def nats_secret() -> dict[str, Any]:
    """The Secret the chart creates for its NATS (charts/asyncrlhf/templates/nats-secret.yaml),
    under the name the example expects."""
    b64 = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "nats-credentials", "namespace": NS},
            "type": "Opaque", "data": {"user": b64(NATS_USER), "password": b64(NATS_PASSWORD)}}


def volume(cluster: Cluster, claim: str) -> Path:
    return cluster.kubelet.root / "volumes" / f"pvc-{NS}-{claim}"


# ---------------------------------------------------------------------------------------------


def test_kubectl_apply_trains_to_the_end_and_kubectl_get_shows_it(cluster, tmp_path):
    steps = 6
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump_all([nats_secret(), manifest("tiny-sort", steps)]))
    # kmock serves neither /openapi/v3 nor /openapi/v2, which kubectl's validation downloads first;
    # the manifest is checked against the CRD's schema in tests/test_crd.py
    show(cluster.kubectl("apply", "--validate=false", "-f", str(path)))
    status = cluster.wait(lambda: (s := cluster.status("tiny-sort")).get("phase") in ("Succeeded", "Failed") and s,
                          what="the job to finish")
    table = cluster.print_table()
    assert status["phase"] == "Succeeded", (status, cluster.kubelet.tail())
    assert status["step"] == steps and status["progress"] == f"{steps}/{steps}"
    assert status["policyVersion"] == steps
    assert status["generatorVersions"] and all(isinstance(v, int) for v in status["generatorVersions"].values())
    assert isinstance(status["rewardMean"], float) and status["rolloutsConsumed"] == steps * 4
    assert "tiny-sort" in table and "Succeeded" in table and f"{steps}/{steps}" in table

    (learner,) = cluster.kubelet.started("learner")
    # the operator may see the learner's last progress before its process has exited
    cluster.wait(lambda: learner.exit_code is not None, what="the learner process to exit")
    assert learner.exit_code == 0 and learner.argv[1:3] == ["learner", "--config"]
    (generator,) = cluster.kubelet.started("generator")
    cluster.wait(lambda: not cluster.kubelet.running(), what="the generators stopped after Succeeded")
    # what the workloads read came through the operator's pod spec: the Secret's keys, the
    # downward API, the mounts (the run's outputs are on the shared claim, the model was built in
    # each pod's /cache emptyDir)
    for pod in (learner, generator):
        assert pod.env[workload_env.NATS_USER] == NATS_USER and pod.env[workload_env.NATS_PASSWORD] == NATS_PASSWORD
        assert pod.env["POD_NAME"] == pod.name and pod.env["POD_NAMESPACE"] == NS
        assert pod.env[workload_env.NATS_URL] == cluster.bus.url
        assert Path(pod.argv[-1]).read_text() == cluster.kube.get(
            f"/api/v1/namespaces/{NS}/configmaps/tiny-sort-config")["data"]["job.yaml"]
    # the learner built the model in its own /cache emptyDir (kept: a finished Job keeps its pod);
    # the generator's went with its pod when the operator scaled it to 0
    assert Path(learner.env[workload_env.CACHE], "models").is_dir()
    assert not Path(generator.env[workload_env.CACHE]).exists()
    assert generator.env[workload_env.GENERATOR_ID] == generator.name
    assert generator.name in status["generatorVersions"]
    assert learner.env["RANK"] == learner.env["NODE_RANK"] == "0" and learner.env["WORLD_SIZE"] == "1"
    shared = volume(cluster, "tiny-sort-snapshots")
    assert learner.env[workload_env.SNAPSHOT_DIR] == generator.env[workload_env.SNAPSHOT_DIR] == str(shared)
    assert (shared / "snapshots" / f"v{steps}").is_dir()
    metrics = (shared / "report" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == list(range(1, steps + 1))


def test_scale_kill_suspend_resume_and_delete(cluster):
    """One job through what a cluster does to it, each checked on the processes themselves:
    a learner killed (SIGKILL) is restarted by the operator's failure policy; generators scaled
    1 -> 2 while it restarts start a second process that takes work; suspend stops every
    process and resume continues from the checkpoint; no step is trained twice and no rollout
    lost across all of it; delete stops every process and removes the stream. The model cache
    is a claim here (model.cache), so restarted pods do not rebuild the tiny model, and an HF
    token Secret is named (model.tokenSecret)."""
    name, kubelet, t0 = "tiny-ops", cluster.kubelet, time.monotonic()
    mark = lambda what: show(f"[{time.monotonic() - t0:6.1f} s] {what}")  # noqa: E731
    if cluster.kube.get(f"/api/v1/namespaces/{NS}/secrets/nats-credentials") is None:  # run alone
        cluster.kube.call("POST", f"/api/v1/namespaces/{NS}/secrets", nats_secret())
    cluster.kube.call("POST", f"/api/v1/namespaces/{NS}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf-token", "namespace": NS},
        "data": {"token": base64.b64encode(b"hf_not_a_real_token").decode()}})
    job = manifest(name, 400, model={"cache": {"size": "1Gi"}, "tokenSecret": {"name": "hf-token", "key": "token"}},
                   learner={"backoffLimit": 2})
    cluster.kube.call("POST", CR, job)
    cluster.wait(lambda: cluster.progress(name).get("step", 0) >= 2, what="step 2")

    # 1. a learner killed the hard way: the Job fails, the operator replaces it
    (first,) = kubelet.running("learner")
    mark(f"step {cluster.progress(name)['step']}: SIGKILL to {first.name}")
    kubelet.kill(first)
    cluster.wait(lambda: cluster.status(name).get("restarts") == 1, what="the operator's restart")
    # 2. scale 1 -> 2 (what `kubectl scale arj/tiny-ops --replicas=2` writes) while it restarts
    cluster.kube.call("PATCH", f"{CR}/{name}", {"spec": {"generator": {"replicas": 2}}})
    cluster.wait(lambda: len(kubelet.running("generator")) == 2, what="two generator processes")
    second = cluster.wait(lambda: [p for p in kubelet.running("learner") if p.name != first.name],
                          what="a new learner process")[0]
    assert first.exit_code == 137 and second.env["HF_TOKEN"] == "hf_not_a_real_token"
    generators = {p.name for p in kubelet.running("generator")}
    mark(f"restarted as {second.name}; generators {sorted(generators)}")
    cluster.wait(lambda: generators <= set(cluster.status(name).get("generatorVersions") or {}),
                 what="both generators reporting")
    ledger_path = volume(cluster, f"{name}-snapshots") / "report" / "ledger.jsonl"

    def trained_from() -> set[str]:
        lines = ledger_path.read_text().splitlines() if ledger_path.exists() else []
        return {gen for line in lines for _rid, gen, _v in json.loads(line)["rollouts"]}

    cluster.wait(lambda: generators <= trained_from(), what="rollouts of both generators trained on")

    # 3. suspend: every process stops; resume: the learner continues from its checkpoint
    before = cluster.progress(name)["step"]
    cluster.kube.call("PATCH", f"{CR}/{name}", {"spec": {"suspend": True}})
    cluster.wait(lambda: cluster.status(name).get("phase") == "Suspended" and not kubelet.running(),
                 what="Suspended with no process left")
    suspended_at = cluster.progress(name)["step"]
    mark(f"suspended at step {suspended_at}, no process left")
    assert suspended_at >= before
    cluster.kube.call("PATCH", f"{CR}/{name}", {"spec": {"suspend": False}})
    cluster.wait(lambda: cluster.progress(name).get("step", 0) >= suspended_at + 2, what="training on after resume")
    mark(f"resumed: step {cluster.progress(name)['step']}")
    (third,) = kubelet.running("learner")
    assert third.name not in (first.name, second.name)

    # 4. delete: every process stops and the stream is gone
    cluster.kube.call("DELETE", f"{CR}/{name}")
    cluster.wait(lambda: cluster.kube.get(f"{CR}/{name}") is None, what="the job deleted")
    # kmock has no garbage collector: delete the children the way it would (by owner)
    for plural, group in (("deployments", "apps/v1"), ("jobs", "batch/v1")):
        cluster.kube.call("DELETE", f"/apis/{group}/namespaces/{NS}/{plural}/{name}-"
                          + ("generator" if plural == "deployments" else "learner"))
    cluster.wait(lambda: not kubelet.running(), what="no process left")
    stream_left = cluster.stream_exists(name)
    mark(f"deleted, no process left; stream left: {stream_left}")

    # nothing lost, nothing trained twice, across the kill and the suspend
    ledger = [json.loads(line) for line in (volume(cluster, f"{name}-snapshots") / "report" / "ledger.jsonl")
              .read_text().splitlines()]
    steps = [row["step"] for row in ledger]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= suspended_at + 2
    trained = [rid for row in ledger for rid, _gen, _v in row["rollouts"]]
    assert len(trained) == len(set(trained)) == 4 * len(steps)
    takers = {gen for row in ledger for _rid, gen, _v in row["rollouts"]}
    assert len(generators & takers) == 2, f"only {takers} produced trained rollouts"
    # the finalizer stops the workloads and waits for their pods before deleting the stream: a
    # learner still running would recreate it (its stream recovery), leaving an orphan
    assert not stream_left, "the job's stream outlived the job"


# --- pods that cannot run: what the status says (no training needed) ---------------------------


def _named_in_status(cluster: Cluster, name: str, pod_prefix: str) -> list[tuple[str, str]]:
    """(reason, message) of the job's conditions whose message names one of its pods."""
    status = cluster.status(name)
    return [(c.get("reason", ""), c.get("message", "")) for c in status.get("conditions") or []
            if pod_prefix in c.get("message", "")]


def _delete(cluster: Cluster, name: str) -> None:
    t0 = time.monotonic()
    cluster.kube.call("DELETE", f"{CR}/{name}")
    cluster.wait(lambda: cluster.kube.get(f"{CR}/{name}") is None, what=f"{name} deleted")
    for plural, group, child in (("deployments", "apps/v1", "generator"), ("jobs", "batch/v1", "learner")):
        cluster.kube.call("DELETE", f"/apis/{group}/namespaces/{NS}/{plural}/{name}-{child}")  # no GC in kmock
    cluster.wait(lambda: not [p for p in cluster.kubelet.running() if p.name.startswith(f"{name}-")],
                 what=f"no process of {name} left")
    show(f"{name}: deleted in {time.monotonic() - t0:.1f} s")


def test_a_crash_looping_generator_is_named_in_the_status(cluster):
    """A generator whose python reward cannot be imported exits with 2 at start; kubelet restarts it
    with its back-off, the pod shows CrashLoopBackOff with the last exit code, and the job's
    status names the pod with health.py's reason (the learner just waits for rollouts)."""
    name = "tiny-crashloop"
    if cluster.kube.get(f"/api/v1/namespaces/{NS}/secrets/nats-credentials") is None:  # run alone
        cluster.kube.call("POST", f"/api/v1/namespaces/{NS}/secrets", nats_secret())
    cluster.kube.call("POST", CR, manifest(name, 3, task={"reward": {"kind": "python",
                                                                      "function": "no_such_module:score"}}))
    try:
        t0 = time.monotonic()
        named = cluster.wait(lambda: _named_in_status(cluster, name, f"{name}-generator-"),
                             what="the crash-looping generator named in the status", timeout=180)
        show(f"{name}: named in the status after {time.monotonic() - t0:.1f} s")
        reason, message = named[0]
        assert reason == "Error" and "keeps failing (Error, exit code 2," in message, named
        # what the generator said before exiting, quoted from its termination message (FallbackToLogsOnError)
        assert "restarts): " in message, f"nothing the generator said is quoted: {named}"
        said = message.split("restarts): ", 1)[1]
        assert said.startswith("error: ") and "cannot import module 'no_such_module'" in said, named
        pod_name = message.split()[1].rstrip(":")
        pod = cluster.kube.get(f"/api/v1/namespaces/{NS}/pods/{pod_name}")
        container = pod["status"]["containerStatuses"][0]
        assert container["lastState"]["terminated"]["exitCode"] == 2
        assert "cannot import module 'no_such_module'" in cluster.kubelet.tail(5)
    finally:
        _delete(cluster, name)


def test_a_missing_secret_is_named_in_the_status(cluster):
    """model.tokenSecret names a Secret that does not exist: no container starts
    (CreateContainerConfigError, as kubelet says it) and the status names the pod, the Secret
    and what to check."""
    name = "tiny-nosecret"
    cluster.kube.call("POST", CR, manifest(name, 3, model={"tokenSecret": {"name": "no-such-secret", "key": "token"}}))
    try:
        t0 = time.monotonic()
        named = cluster.wait(lambda: _named_in_status(cluster, name, f"{name}-"),
                             what="the missing Secret in the status", timeout=120)
        show(f"{name}: named in the status after {time.monotonic() - t0:.1f} s")
        reason, message = named[0]
        assert reason == "CreateContainerConfigError", named
        assert 'secret "no-such-secret" not found' in message and "a Secret or ConfigMap the pod names" in message
        assert cluster.status(name).get("phase") == "Pending"
        assert not [p for p in cluster.kubelet.started("learner") + cluster.kubelet.started("generator")
                    if p.name.startswith(f"{name}-") and p.proc is not None]
    finally:
        _delete(cluster, name)
