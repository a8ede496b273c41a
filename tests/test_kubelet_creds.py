"""The operator mints a job's NATS user and the job trains with it over TLS (issue 18's `creds` key).

A real nats-server in decentralised JWT mode (memory resolver, keys from `natsauth.bootstrap`,
what `asyncrlhf nats-auth` writes for the chart) accepts no password and no anonymous client.
The operator holds only the jobs' account signing seed ($ASYNCRLHF_NATS_ACCOUNT_SEED, as the
chart passes it): it mints its own user, and for the job — which names no credentialsSecret — the
Secret `<job>-nats` whose `creds` key reaches the pods through their volume and
ASYNCRLHF_NATS_CREDS. The process kubelet (tests/kubelet.py) runs the pods from the operator's
specs; the job trains to the end with users that can reach nothing but its own stream and bucket.
The server speaks TLS only (certificates made by the test): the operator verifies it with its CA
($ASYNCRLHF_NATS_TLS_CA, as the chart mounts it) and copies `ca.crt` into `<job>-nats`, from
where the pods verify it too (ASYNCRLHF_NATS_TLS_CA); the server's /connz shows every client on TLS.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.request
from pathlib import Path

import pytest
from kopf.testing import KopfRunner

from asyncrlhf import workload_env
from asyncrlhf.bus import EmbeddedNats, JobBus, free_port
from asyncrlhf_operator import natsauth
from asyncrlhf_operator.handlers import build_registry
from asyncrlhf_operator.settings import OperatorConfig
from kubelet import Kubelet
from test_kubelet import CR, NS, KubeApi, manifest, show
from test_natsauth import certificates

pytestmark = [pytest.mark.kubelet, pytest.mark.slow]
NAME, STEPS = "tiny-creds", 2


def wait(check, what: str, kubelet: Kubelet, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{kubelet.tail()}")
        time.sleep(0.2)
    return result


def _clients(monitor: int, at_least: int) -> list[dict]:
    """The server's client connections (its monitoring endpoint), once there are `at_least`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/connz", timeout=5) as response:
        connections = json.loads(response.read())["connections"] or []
    return connections if len(connections) >= at_least else []


def test_the_operator_mints_the_jobs_creds_and_the_job_trains_with_them(tmp_path, monkeypatch):
    keys = natsauth.bootstrap("kubelet-test")
    monkeypatch.setenv(natsauth.ACCOUNT_SEED_ENV, keys.signing_seed)  # the operator's env (the chart's Secret)
    monkeypatch.setenv(natsauth.ACCOUNT_ENV, keys.account)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    certs = certificates(tmp_path)
    monkeypatch.setenv(workload_env.NATS_TLS_CA, str(certs["ca"]))  # the operator's CA file (the chart's mount)
    monitor = free_port()
    config = keys.resolver_config() + (f'http: "127.0.0.1:{monitor}"\ntls {{ cert_file: "{certs["server"]}"\n'
                                       f' key_file: "{certs["server.key"]}" }}\n')
    job = manifest(NAME, STEPS, model={"cache": {"size": "1Gi"}})  # one claim: the tiny model is built once
    del job["spec"]["nats"]["credentialsSecret"]  # the operator's bus, the operator's user for the job
    with EmbeddedNats(tmp_path / "nats", config=config) as bus, KubeApi() as kube:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": kube.url}}], "users": [{"name": "kmock", "user": {}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": NS}}]}))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.setattr("kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
        registry = build_registry(OperatorConfig(nats_url=bus.url, status_interval=1.0, resync_interval=60.0))
        with KopfRunner(["run", "-A", "--standalone"], registry=registry, timeout=60) as runner, \
                Kubelet(kube.url, tmp_path / "node") as kubelet:
            kube.call("POST", CR, job)
            connections = wait(lambda: _clients(monitor, 3), "the operator, learner and generator connected", kubelet)
            status = wait(lambda: (s := (kube.get(f"{CR}/{NAME}") or {}).get("status") or {}).get("phase")
                          in ("Succeeded", "Failed") and s, "the job to finish", kubelet)
            assert status["phase"] == "Succeeded" and status["step"] == STEPS, (status, kubelet.tail())
            secret = kube.get(f"/api/v1/namespaces/{NS}/secrets/{NAME}-nats")
            (learner,) = kubelet.started("learner")
            (generator,) = kubelet.started("generator")
        assert not kubelet.errors, kubelet.errors[-1]
    assert runner.exception is None, runner.output

    # the Secret: the operator's, owned by the job (deleted with it), one user for this job only
    assert [o["name"] for o in secret["metadata"]["ownerReferences"]] == [NAME]
    creds = base64.b64decode(secret["data"]["creds"]).decode()
    claims = natsauth.decode(natsauth.jwt_of(creds), issuer=keys.authority().signing_key)
    assert claims["name"] == f"{NS}/{NAME}" and keys.authority().still_valid(creds, JobBus(NS, NAME))
    # the pods read it where the operator's pod spec put it, and nothing else to log in with
    for pod in (learner, generator):
        assert Path(pod.env[workload_env.NATS_CREDS]).read_text() == creds
        assert pod.env[workload_env.NATS_INBOX_PREFIX] == JobBus(NS, NAME).inbox_prefix
        assert workload_env.NATS_USER not in pod.env and workload_env.NATS_PASSWORD not in pod.env
        assert natsauth.ACCOUNT_SEED_ENV not in pod.env
        assert Path(pod.env[workload_env.NATS_TLS_CA]).read_text() == certs["ca"].read_text()
    assert base64.b64decode(secret["data"]["ca.crt"]).decode() == certs["ca"].read_text()
    assert all(c.get("tls_version", "").startswith("1.") for c in connections), connections
    show(f"\n{NAME}: {STEPS} steps trained with the operator-minted user {claims['sub'][:12]}... "
         f"(pub {len(claims['nats']['pub']['allow'])} subjects, sub {claims['nats']['sub']['allow']})")
