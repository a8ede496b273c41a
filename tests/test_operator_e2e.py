"""End to end on a real cluster: opt-in with `pytest --with-e2e tests/test_operator_e2e.py`.

Needs the current kubeconfig context to reach a cluster where the operator runs (for example
`helm install asyncrlhf charts/asyncrlhf`) and can pull the workloads image; the CRD is
applied from crds/ here (idempotent). Each run works in a fresh namespace, deleted at the end.
Skipped without --with-e2e or when no cluster answers.

The example names `spec.nats.credentialsSecret: nats-credentials`: the fixture copies the chart's
NATS Secret into the test namespace under that name (docs/install.md, step 3), as a user would.

Environment: ASYNCRLHF_E2E_TIMEOUT (seconds to wait for Running, default 900),
ASYNCRLHF_E2E_NATS_SECRET (the chart's NATS Secret as NAMESPACE/NAME, default
asyncrlhf-system/asyncrlhf-nats-auth; empty when the chart runs NATS without auth),
ASYNCRLHF_E2E_IMAGE (the workloads image, default the example's),
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
NATS_SECRET = os.environ.get("ASYNCRLHF_E2E_NATS_SECRET", "asyncrlhf-system/asyncrlhf-nats-auth")

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
    copy_nats_credentials(name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


def copy_nats_credentials(namespace: str) -> None:
    """The Secret the example's spec.nats.credentialsSecret names, from the chart's NATS Secret."""
    if not NATS_SECRET:
        kubectl("create", "secret", "generic", "nats-credentials", "-n", namespace)
        return
    source_namespace, source = NATS_SECRET.split("/", 1)
    data = json.loads(kubectl("get", "secret", source, "-n", source_namespace, "-o", "json").stdout)["data"]
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
              "metadata": {"name": "nats-credentials", "namespace": namespace}, "data": data}
    kubectl("apply", "-f", "-", stdin=json.dumps(secret))


def example_manifest() -> dict:
    manifest = yaml.safe_load(EXAMPLE.read_text())
    if os.environ.get("ASYNCRLHF_E2E_IMAGE"):
        manifest["spec"]["image"] = os.environ["ASYNCRLHF_E2E_IMAGE"]
    # a pod template, to see it reach real pods
    manifest["spec"]["generator"]["podTemplate"] = {"metadata": {"labels": {"e2e": "yes"}}}
    return manifest


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
    manifest = example_manifest()
    name = manifest["metadata"]["name"]
    kubectl("apply", "--server-side", "-n", namespace, "-f", "-", stdin=json.dumps(manifest))
    wait_for(lambda: job(namespace, name).get("status", {}).get("phase") in ("Running", "Succeeded"),
             TIMEOUT, f"{name} to be Running")
    table = kubectl("get", "arj", "-n", namespace).stdout
    header = table.splitlines()[0].split()
    assert header[:9] == ["NAME", "PHASE", "MODE", "STEP", "GENERATORS", "VERSION", "STALENESS", "REWARD",
                          "AGE"], table
    assert name in table
    for kind, child in [("configmap", f"{name}-config"), ("job", f"{name}-learner"),
                        ("deployment", f"{name}-generator"), ("service", f"{name}-learner"),
                        ("networkpolicy", f"{name}-workload")]:
        kubectl("get", kind, child, "-n", namespace)
    wait_for(lambda: job(namespace, name).get("status", {}).get("step", 0) >= 1, TIMEOUT,
             "the first learner step in .status")
    pods = kubectl("get", "pods", "-n", namespace, "-l", "e2e=yes", "-o", "name").stdout.split()
    assert pods, "the generator pods carry the podTemplate's label"


def test_kubectl_scale_sets_the_generators(namespace):
    name = yaml.safe_load(EXAMPLE.read_text())["metadata"]["name"]
    kubectl("scale", f"arj/{name}", "-n", namespace, "--replicas=2")
    wait_for(lambda: kubectl("get", "deployment", f"{name}-generator", "-n", namespace,
                             "-o", "jsonpath={.spec.replicas}").stdout == "2", 120, "2 generator replicas")
    kubectl("scale", f"arj/{name}", "-n", namespace, "--replicas=1")


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
