"""End to end on a real cluster: opt-in with `pytest --with-e2e tests/test_operator_e2e.py`.

Needs the current kubeconfig context to reach a cluster where the operator runs (for example
`helm install asyncrlhf charts/asyncrlhf`) and can pull the workloads image; the CRD is
applied from crds/ here (idempotent). Each run works in a fresh namespace, deleted at the end.
Skipped without --with-e2e or when no cluster answers.

Environment: ASYNCRLHF_E2E_TIMEOUT (seconds to wait for Running, default 900),
ASYNCRLHF_KUBECTL (a kubectl to use instead of the one on PATH or from tests/helm_tools.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "local-tiny.yaml"
TIMEOUT = float(os.environ.get("ASYNCRLHF_E2E_TIMEOUT", "900"))

pytestmark = pytest.mark.e2e


def kubectl_path() -> str:
    explicit = os.environ.get("ASYNCRLHF_KUBECTL") or shutil.which("kubectl")
    if explicit:
        return explicit
    from helm_tools import kubectl_binary  # tests/ is on sys.path under pytest

    return str(kubectl_binary())


def kubectl(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([kubectl_path(), *args], input=stdin, capture_output=True, text=True,
                          timeout=120, check=check)


@pytest.fixture(scope="module")
def namespace():
    if kubectl("version", "--request-timeout=10s", check=False).returncode != 0:
        pytest.skip("no Kubernetes cluster answers for the current kubeconfig context")
    kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    kubectl("wait", "--for=condition=Established", "crd/asyncrlhfjobs.asyncrlhf.dev", "--timeout=60s")
    name = f"arj-e2e-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


def job(namespace: str, name: str) -> dict:
    return json.loads(kubectl("get", "arj", name, "-n", namespace, "-o", "json").stdout)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def test_example_runs_and_shows_in_kubectl_get(namespace):
    manifest = yaml.safe_load(EXAMPLE.read_text())
    name = manifest["metadata"]["name"]
    kubectl("apply", "-n", namespace, "-f", str(EXAMPLE))
    wait_for(lambda: job(namespace, name).get("status", {}).get("phase") in ("Running", "Succeeded"),
             TIMEOUT, f"{name} to be Running")
    table = kubectl("get", "arj", "-n", namespace).stdout
    header = table.splitlines()[0].split()
    assert header[:8] == ["NAME", "PHASE", "MODE", "STEP", "VERSION", "STALENESS", "REWARD", "AGE"], table
    assert name in table
    for kind, child in [("configmap", f"{name}-config"), ("job", f"{name}-learner"),
                        ("deployment", f"{name}-generator"), ("service", f"{name}-learner"),
                        ("networkpolicy", f"{name}-workload")]:
        kubectl("get", kind, child, "-n", namespace)
    wait_for(lambda: job(namespace, name).get("status", {}).get("step", 0) >= 1, TIMEOUT,
             "the first learner step in .status")


def test_suspend_scales_generators_to_zero(namespace):
    name = yaml.safe_load(EXAMPLE.read_text())["metadata"]["name"]
    kubectl("patch", "arj", name, "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    wait_for(lambda: job(namespace, name).get("status", {}).get("phase") == "Suspended", 120, "Suspended")
    replicas = kubectl("get", "deployment", f"{name}-generator", "-n", namespace,
                       "-o", "jsonpath={.spec.replicas}").stdout
    assert replicas == "0"
    kubectl("patch", "arj", name, "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    wait_for(lambda: job(namespace, name).get("status", {}).get("phase") in ("Running", "Succeeded"),
             TIMEOUT, "Running again")


def test_cel_rule_rejects_an_invalid_spec_at_admission(namespace):
    bad = {"apiVersion": "asyncrlhf.dev/v1alpha1", "kind": "AsyncRLHFJob",
           "metadata": {"name": "bad-staleness"},
           "spec": {"async": {"maxStaleness": 0}, "weightSync": {"everySteps": 4}}}
    result = kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(bad), check=False)
    assert result.returncode != 0 and "maxStaleness" in result.stderr, result.stderr


def test_delete_cleans_up(namespace):
    name = yaml.safe_load(EXAMPLE.read_text())["metadata"]["name"]
    kubectl("delete", "arj", name, "-n", namespace, "--timeout=120s")
    wait_for(lambda: kubectl("get", "deployment", f"{name}-generator", "-n", namespace,
                             check=False).returncode != 0, 120, "garbage collection of the children")
