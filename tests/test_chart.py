"""The Helm chart, rendered by the real helm v4 binary and checked object by object.

What matters here is what a cluster admin relies on: the operator's RBAC is exactly the minimum it
uses (no wildcards), every pod runs non-root on a read-only root filesystem, NATS has JetStream and
authentication and its credentials only ever travel by secretKeyRef, the chart's CRD is the
generated one, and every rendered object passes the official Kubernetes schemas in strict mode
(unknown fields are errors). The rendered NATS configuration is also run by a real nats-server.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from asyncrlhf.natsserver import free_port, nats_server_binary

from helm_tools import helm_binary

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "asyncrlhf"
CHART_CRD = CHART / "files" / "crd.yaml"
GENERATED_CRD = REPO / "crds" / "asyncrlhf.dev_asyncrlhfjobs.yaml"
RELEASE, NAMESPACE = "arl", "asyncrlhf-system"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas we have.
KUBE_VERSIONS = ("1.29", "1.37")

# Each scenario is a values override; "default" is the chart as shipped.
SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "external-nats": {
        "nats": {"enabled": False, "externalUrl": "nats://nats.messaging.svc:4222",
                 "auth": {"existingSecret": "bus-credentials"}},
    },
    "namespaced": {"rbac": {"scope": "namespaced"}, "operator": {"watchNamespace": "team-a"}},
    "namespaced-no-cluster-objects": {
        "rbac": {"scope": "namespaced"}, "crds": {"install": False},
    },
    "crds-off": {"crds": {"install": False}},
    "crds-not-kept": {"crds": {"keep": False}},
    "service-monitor": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}},
    "workload-metrics": {"metrics": {"podMonitor": {"enabled": True, "labels": {"release": "prom"}},
                                     "dashboard": {"enabled": True}},
                         "rbac": {"scope": "namespaced"}, "operator": {"watchNamespace": "team-a"}},
    "no-network-policy": {"networkPolicy": {"enabled": False}},
    "nats-without-auth": {"nats": {"auth": {"enabled": False}}},
    "nats-jwt-tls": {"nats": {"auth": {"mode": "jwt", "jwt": {"existingSecret": "asyncrlhf-nats-jwt"}},
                              "tls": {"enabled": True, "secretName": "nats-tls"}}},
    "ha": {"operator": {"replicas": 2, "peering": {"enabled": True}}},
    "ha-namespaced": {"operator": {"replicas": 2, "peering": {"enabled": True}, "watchNamespace": "rlhf"},
                      "rbac": {"scope": "namespaced"}},
}

# The operator's API calls, kopf's and its own (asyncrlhf_operator/kube.py): (apiGroup, resource)
# -> verbs. Children are server-side applied (patch, create) and read and deleted, never listed
# or watched; kopf never PUTs (no update) and posts only core/v1 Events.
APPLIED = {"get", "create", "patch"}
NAMESPACED_RULES = {
    ("asyncrlhf.dev", "asyncrlhfjobs"): {"get", "list", "watch", "patch", "delete"},
    ("asyncrlhf.dev", "asyncrlhfjobs/status"): {"get", "patch"},
    ("asyncrlhf.dev", "asyncrlhfjobs/finalizers"): {"update"},
    ("", "configmaps"): APPLIED,
    ("", "persistentvolumeclaims"): APPLIED | {"delete"},
    ("", "services"): APPLIED,
    ("", "serviceaccounts"): APPLIED,
    ("apps", "deployments"): APPLIED | {"delete"},  # a TBA searcher dropped from the spec
    ("batch", "jobs"): APPLIED | {"delete"},
    ("networking.k8s.io", "networkpolicies"): APPLIED,
    ("snapshot.storage.k8s.io", "volumesnapshots"): APPLIED | {"delete"},
    ("", "secrets"): {"get"},  # jwt or TLS: create and patch too (JWT_RULES)
    ("", "pods"): {"list"},
    ("", "events"): {"create"},
    ("kueue.x-k8s.io", "workloads"): APPLIED | {"delete"},
    ("kueue.x-k8s.io", "workloads/status"): {"patch"},
}
# nats.auth.mode jwt or nats.tls.enabled: the operator writes each job's Secret <job>-nats (jetstream.py)
JWT_RULES = {**NAMESPACED_RULES, ("", "secrets"): APPLIED}
CRD_READ_RULES = {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"}}
# Kinds that have no official schema (custom resources), checked by hand below instead.
UNSCHEMAED_KINDS = {"CustomResourceDefinition", "ServiceMonitor", "PodMonitor", "ClusterKopfPeering", "KopfPeering"}


# --------------------------------------------------------------------------- rendering helpers


def run_helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(helm_binary()), *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, "HELM_CACHE_HOME": str(REPO / ".cache" / "helm"),
             "HELM_CONFIG_HOME": str(REPO / ".cache" / "helm"), "HELM_DATA_HOME": str(REPO / ".cache" / "helm")},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def values_file(overrides: dict[str, Any]) -> str:
    directory = REPO / ".cache" / "chart-values"
    directory.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(overrides, sort_keys=True)
    path = directory / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
    path.write_text(text)
    return str(path)


@functools.cache
def _render_text(scenario: str) -> str:
    return run_helm(
        "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
        "--kube-version", f"{KUBE_VERSIONS[-1]}.0", "-f", values_file(SCENARIOS[scenario]),
    ).stdout


def render(scenario: str) -> list[dict[str, Any]]:
    """The rendered objects of a scenario (a fresh copy: tests may modify it)."""
    return [doc for doc in yaml.safe_load_all(_render_text(scenario)) if doc]


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in by_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def pod_specs(objects: list[dict]) -> Iterator[tuple[str, dict, dict]]:
    """(workload name, pod template metadata, pod spec) of every workload."""
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            template = obj["spec"]["template"]
            yield obj["metadata"]["name"], template["metadata"], template["spec"]
        elif obj["kind"] == "Pod":
            yield obj["metadata"]["name"], obj["metadata"], obj["spec"]


def operator_container(objects: list[dict]) -> dict:
    deployment = one(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def rbac_rules(role: dict) -> dict[tuple[str, str], set[str]]:
    rules: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                rules.setdefault((group, resource), set()).update(rule["verbs"])
    return rules


# --------------------------------------------------------------------------- official schemas


@functools.cache
def _definitions(version: str) -> tuple[Path, Registry]:
    import kubernetes_validate

    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    available = sorted(
        (p for p in root.iterdir() if p.name.endswith("-local-strict")),
        key=lambda p: tuple(int(x) for x in p.name[1:].split("-")[0].split(".")[:2]),
    )
    wanted = tuple(int(x) for x in version.split("."))
    chosen = [p for p in available if tuple(int(x) for x in p.name[1:].split("-")[0].split(".")[:2]) <= wanted]
    assert chosen, f"kubernetes-validate has no schemas for Kubernetes {version} or older"
    directory = chosen[-1]
    definitions = json.loads((directory / "_definitions.json").read_text())
    return directory, Resource.from_contents(definitions) @ Registry()


@functools.cache
def _validator(version: str, kind: str, api_version: str) -> jsonschema.Validator:
    directory, registry = _definitions(version)
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    path = directory / f"{kind.lower()}-{group_version}.json"
    assert path.is_file(), f"no official schema for {kind} {api_version} in Kubernetes {version}"
    schema = json.loads(path.read_text())
    return jsonschema.Draft202012Validator(schema, registry=Resource.from_contents(schema) @ registry)


def schema_errors(obj: dict, version: str) -> list[str]:
    validator = _validator(version, obj["kind"], obj["apiVersion"])
    return [
        f"{obj['kind']}/{obj['metadata']['name']} at /{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(obj)
    ]


# --------------------------------------------------------------------------- lint and schemas


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_helm_lint_passes_strict(scenario: str) -> None:
    result = run_helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE,
                      "-f", values_file(SCENARIOS[scenario]))
    assert "0 chart(s) failed" in result.stdout, result.stdout


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_object_passes_the_official_schema_strictly(scenario: str, version: str) -> None:
    objects = [o for o in render(scenario) if o["kind"] not in UNSCHEMAED_KINDS]
    assert objects
    errors = [error for obj in objects for error in schema_errors(obj, version)]
    assert not errors, "\n".join(errors)


def test_the_schema_check_is_not_vacuous() -> None:
    deployment = one(render("default"), "Deployment")
    assert not schema_errors(deployment, KUBE_VERSIONS[-1])
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFs"] = True
    deployment["spec"]["replicas"] = "one"
    errors = schema_errors(deployment, KUBE_VERSIONS[-1])
    assert len(errors) == 2 and any("readOnlyRootFs" in e for e in errors), errors


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_objects_are_named_uniquely_and_namespaced_to_the_release(scenario: str) -> None:
    objects = render(scenario)
    keys = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys)), keys
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "ClusterKopfPeering"}
    for kind, namespace, name in keys:
        assert (namespace is None) == (kind in cluster_scoped), (kind, name, namespace)
        assert len(name) <= 63, name
    assert all(o["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE for o in objects)


# --------------------------------------------------------------------------- RBAC


def test_cluster_rbac_is_exactly_the_operator_minimum() -> None:
    objects = render("default")
    assert not by_kind(objects, "Role") and not by_kind(objects, "RoleBinding")
    role = one(objects, "ClusterRole")
    assert rbac_rules(role) == {**NAMESPACED_RULES, **CRD_READ_RULES}
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert_binds_operator(objects, binding)


def test_namespaced_rbac_is_a_role_in_the_watched_namespace() -> None:
    objects = render("namespaced")
    role, binding = one(objects, "Role"), one(objects, "RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "team-a"
    assert rbac_rules(role) == NAMESPACED_RULES
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert_binds_operator(objects, binding)
    # The operator disables kopf's cluster scan in namespaced mode: nothing cluster-wide is granted.
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")
    assert operator_container(objects)["args"][:3] == ["operator", "--namespace", "team-a"]


def test_namespaced_rbac_without_crds_creates_no_cluster_scoped_object() -> None:
    objects = render("namespaced-no-cluster-objects")
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}, kinds
    assert one(objects, "Role")["metadata"]["namespace"] == NAMESPACE  # watchNamespace defaults


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rbac_has_no_wildcards_and_cannot_enumerate_secrets(scenario: str) -> None:
    for role in by_kind(render(scenario), "Role") + by_kind(render(scenario), "ClusterRole"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], (role["metadata"]["name"], rule)
            if "secrets" in rule["resources"]:  # read one Secret by name (write the jobs'), never enumerate them
                assert rule["verbs"] in (["get"], ["get", "create", "patch"]) and rule["resources"] == ["secrets"], rule
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule


# Where the chart knowingly differs from docs/operator.md's RBAC list, and why.
DOC_ONLY = {
    # kopf lists namespaces only to resolve namespace *patterns* (kopf/_core/reactor/observation.py,
    # namespace_observer: `if not settings.scanning.disabled and not clusterwide`); the operator
    # runs with --all-namespaces or one exact --namespace, so it never does.
    ("", "namespaces", "list"), ("", "namespaces", "watch"),
}
CHART_ONLY = {
    # blockOwnerDeletion on the children's ownerReferences needs it where the
    # OwnerReferencesPermissionEnforcement admission plugin is on (OpenShift, hardened clusters).
    ("asyncrlhf.dev", "asyncrlhfjobs/finalizers", "update"),
}


def test_rbac_matches_the_operators_documented_rules() -> None:
    """docs/operator.md lists the operator's RBAC; the chart grants the same (cluster scope)."""
    doc = REPO / "docs" / "operator.md"
    if not doc.is_file():
        pytest.skip("docs/operator.md is not written yet")
    section = doc.read_text().split("## RBAC", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, flags=re.S).group(1)
    documented = {(g, r, v) for rule in yaml.safe_load(block)["rules"]
                  for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    granted = {(g, r, v) for (g, r), verbs in rbac_rules(one(render("default"), "ClusterRole")).items()
               for v in verbs}
    assert documented - granted <= DOC_ONLY, sorted(documented - granted - DOC_ONLY)
    assert granted - documented <= CHART_ONLY, sorted(granted - documented - CHART_ONLY)


def assert_binds_operator(objects: list[dict], binding: dict) -> None:
    account = one(objects, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": NAMESPACE}]
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]


# --------------------------------------------------------------------------- pods


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_pod_is_non_root_read_only_and_unprivileged(scenario: str) -> None:
    workloads = list(pod_specs(render(scenario)))
    assert workloads
    for name, _, spec in workloads:
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, name
        assert pod.get("runAsUser", 1000) != 0, name
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), name
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container.get("securityContext", {})
            where = f"{name}/{container['name']}"
            assert context.get("readOnlyRootFilesystem") is True, where
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not context.get("capabilities", {}).get("add"), where
            assert context.get("runAsUser", 1000) != 0 and not context.get("privileged"), where
            assert container["resources"]["requests"] and container["resources"]["limits"]["memory"], where
            assert re.search(r"(:[\w.-]+|@sha256:[a-f0-9]{64})$", container["image"]), where
            assert not container["image"].endswith(":latest"), where


def test_operator_deployment_matches_the_operator_contract() -> None:
    objects = render("default")
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # standalone: never two at once
    container = operator_container(objects)
    assert container["image"] == f"ghcr.io/asyncrlhf/operator:{chart_app_version()}"
    assert container["command"] == ["asyncrlhf"]
    assert container["args"] == ["operator", "--all-namespaces",
                                 "--nats-url", f"nats://{RELEASE}-asyncrlhf-nats.{NAMESPACE}.svc.cluster.local:4222",
                                 "--health-port", "8080", "--metrics-port", "9090"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 8080, "metrics": 9090}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/tmp" in mounts  # the only writable path, on a read-only root


@pytest.mark.parametrize("scenario, peering_kind, resource", [
    ("ha", "ClusterKopfPeering", "clusterkopfpeerings"), ("ha-namespaced", "KopfPeering", "kopfpeerings")])
def test_replicas_with_peering_share_one_peering_object_and_only_its_grants(scenario, peering_kind, resource):
    objects = render(scenario)
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    env = {e["name"]: e for e in operator_container(objects)["env"]}
    peering = one(objects, peering_kind)
    assert env["ASYNCRLHF_OPERATOR_PEERING"]["value"] == peering["metadata"]["name"]  # what the operator reads
    assert env["POD_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}  # kopf's identity
    assert peering["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"  # after its CRD
    if peering_kind == "KopfPeering":
        assert peering["metadata"]["namespace"] == "rlhf"  # where the namespaced operator looks
    crds = {c["metadata"]["name"] for c in by_kind(objects, "CustomResourceDefinition")}
    assert {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"} <= crds
    role = one(objects, "ClusterRole" if peering_kind == "ClusterKopfPeering" else "Role")
    assert rbac_rules(role)[("kopf.dev", resource)] == {"list", "watch", "patch"}
    assert not any(g == "kopf.dev" for g, _ in rbac_rules(one(render("default"), "ClusterRole")))


def test_operator_args_and_env_follow_the_values() -> None:
    values = {"operator": {"extraArgs": ["--verbose"], "image": {"digest": "sha256:" + "a" * 64},
                           "extraEnv": [{"name": "LOG_FORMAT", "value": "json"}]}}
    SCENARIOS["extras"] = values
    try:
        container = operator_container(render("extras"))
    finally:
        del SCENARIOS["extras"]
    assert container["args"][-1] == "--verbose"
    assert container["image"] == "ghcr.io/asyncrlhf/operator@sha256:" + "a" * 64
    assert {"name": "LOG_FORMAT", "value": "json"} in container["env"]


def chart_app_version() -> str:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]


def test_chart_app_version_is_the_package_version() -> None:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert chart_app_version() == project["version"]


# --------------------------------------------------------------------------- NATS and secrets


def test_nats_runs_jetstream_on_a_persistent_volume_with_auth() -> None:
    objects = render("default")
    statefulset = one(objects, "StatefulSet")
    spec = statefulset["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["image"].startswith("nats:2.")
    config_name = next(v["configMap"]["name"] for v in spec["volumes"] if "configMap" in v)
    config = one(objects, "ConfigMap", config_name)["data"]["nats.conf"]
    store = re.search(r"jetstream\s*\{[^}]*store_dir:\s*(\S+)", config)
    assert store, config
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    mounted = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounted[store.group(1)] == claim["metadata"]["name"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert re.search(r"authorization\s*\{\s*user:\s*\$NATS_USER\s+password:\s*\$NATS_PASSWORD\s*\}", config)
    secret = one(objects, "Secret")
    env = {e["name"]: e for e in container["env"]}
    for name, key in (("NATS_USER", "user"), ("NATS_PASSWORD", "password")):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": key}
    password = base64.b64decode(secret["data"]["password"]).decode()
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]{39}", password)  # a bare token in nats.conf
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz?js-enabled-only=true"


def test_nats_without_auth_hands_out_no_credentials() -> None:
    objects = render("nats-without-auth")
    assert not by_kind(objects, "Secret")
    config = next(o for o in by_kind(objects, "ConfigMap") if "nats.conf" in o["data"])["data"]["nats.conf"]
    assert "authorization" not in config and "jetstream" in config
    assert not any("NATS_" in e["name"] for e in operator_container(objects)["env"])


def test_the_operator_gets_the_nats_credentials_by_secret_reference() -> None:
    for scenario, secret_name in (("default", f"{RELEASE}-asyncrlhf-nats-auth"),
                                  ("external-nats", "bus-credentials")):
        env = {e["name"]: e for e in operator_container(render(scenario))["env"]}
        # The same variable names the operator gives the job pods (asyncrlhf_operator.plan).
        assert env["ASYNCRLHF_NATS_USER"]["valueFrom"]["secretKeyRef"] == {"name": secret_name, "key": "user"}
        assert env["ASYNCRLHF_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": secret_name, "key": "password"}


def test_external_nats_renders_no_bus_and_points_the_operator_at_it() -> None:
    objects = render("external-nats")
    assert not {"StatefulSet", "Secret", "ConfigMap"} & {o["kind"] for o in objects}
    args = operator_container(objects)["args"]
    assert args[args.index("--nats-url") + 1] == "nats://nats.messaging.svc:4222"
    (policy,) = by_kind(objects, "NetworkPolicy")
    assert {"ports": [{"port": 4222, "protocol": "TCP"}]} in policy["spec"]["egress"]


def test_jwt_mode_gives_the_operator_only_the_signing_seed_and_the_server_only_its_trust() -> None:
    objects = render("nats-jwt-tls")
    assert not by_kind(objects, "Secret")  # no shared password: the keys come from `asyncrlhf nats-auth`
    env = {e["name"]: e for e in operator_container(objects)["env"]}
    assert "ASYNCRLHF_NATS_USER" not in env and "ASYNCRLHF_NATS_PASSWORD" not in env
    for name, key in (("ASYNCRLHF_NATS_ACCOUNT_SEED", "account-signing-seed"), ("ASYNCRLHF_NATS_ACCOUNT", "account")):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "asyncrlhf-nats-jwt", "key": key}
    assert env["ASYNCRLHF_NATS_TLS_CA"]["value"] == "/etc/asyncrlhf/nats-tls/ca.crt"
    volumes = {v["name"]: v for v in one(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["nats-ca"]["secret"] == {"secretName": "nats-tls", "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    server = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    projected = {v["name"]: v["secret"] for v in server["volumes"] if "secret" in v}
    assert projected["jwt"]["items"] == [{"key": "resolver.conf", "path": "resolver.conf"}]  # never the seed
    assert {i["key"] for i in projected["tls"]["items"]} == {"tls.crt", "tls.key"}
    assert not any(e["name"].startswith("NATS_") for e in server["containers"][0]["env"])
    assert rbac_rules(one(objects, "ClusterRole")) == {**JWT_RULES, **CRD_READ_RULES}


def test_the_rendered_jwt_and_tls_config_runs_and_admits_only_minted_users(tmp_path: Path) -> None:
    """A real nats-server on the chart's nats.conf in JWT + TLS mode, with the Secret `asyncrlhf
    nats-auth` makes and certificates made here: the operator's minted user (through the CA)
    uses JetStream; no user, and no TLS trust, get nowhere."""
    from asyncrlhf_operator import natsauth
    from test_natsauth import certificates

    keys, certs = natsauth.bootstrap("chart-test"), certificates(tmp_path)
    config = next(o for o in by_kind(render("nats-jwt-tls"), "ConfigMap") if "nats.conf" in o["data"])["data"]["nats.conf"]
    client, monitor = free_port(), free_port()
    config = (config.replace("store_dir: /data", f"store_dir: {tmp_path / 'store'}")
              .replace("/var/run/nats/nats.pid", str(tmp_path / "nats.pid"))
              .replace("/etc/nats-tls/tls.crt", str(certs["server"])).replace("/etc/nats-tls/tls.key", str(certs["server.key"]))
              .replace("0.0.0.0:4222", f"127.0.0.1:{client}").replace("0.0.0.0:8222", f"127.0.0.1:{monitor}"))
    for where, text in (("nats/nats.conf", config), ("nats-jwt/resolver.conf", keys.secret_data()["resolver.conf"])):
        (tmp_path / where).parent.mkdir(exist_ok=True)
        (tmp_path / where).write_text(text)  # the two mounts side by side, as in the pod (/etc/nats, /etc/nats-jwt)
    log = open(tmp_path / "nats.log", "wb")
    server = subprocess.Popen([nats_server_binary(), "-c", str(tmp_path / "nats" / "nats.conf")],
                              env={**os.environ, "POD_NAME": "nats-0"}, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for_port(client, server, tmp_path / "nats.log")
        asyncio.run(_check_jwt_and_tls(f"nats://127.0.0.1:{client}", keys, certs))
    finally:
        server.terminate()
        server.wait(10)
        log.close()


async def _check_jwt_and_tls(url: str, keys, certs: dict[str, Path]) -> None:
    import nats
    from nats.aio.client import RawCredentials

    from asyncrlhf.bus import tls_context

    tls = tls_context(str(certs["ca"]))
    for options in ({"tls": tls}, {"user_credentials": RawCredentials(keys.authority().operator_creds()),
                                   "tls": tls_context(str(certs["other"]))}):
        with pytest.raises((nats.errors.NoServersError, nats.errors.Error, OSError)):
            await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False, **options)
    connection = await nats.connect(url, user_credentials=RawCredentials(keys.authority().operator_creds()),
                                    tls=tls, connect_timeout=5)
    try:
        await connection.jetstream().add_stream(name="CHART_TEST", subjects=["chart.test"])
        assert (await connection.jetstream().publish("chart.test", b"rollout")).seq == 1
    finally:
        await connection.close()


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_no_secret_value_appears_outside_secrets(scenario: str) -> None:
    objects = render(scenario)
    secrets = [base64.b64decode(v).decode() for s in by_kind(objects, "Secret") for v in s["data"].values()]
    secrets = [s for s in secrets if len(s) >= 12]  # the user name is not secret
    others = yaml.safe_dump_all([o for o in objects if o["kind"] != "Secret"])
    for value in secrets:
        assert value not in others
    for name, _, spec in pod_specs(objects):
        for container in spec["containers"]:
            for entry in container.get("env", []):
                if re.search(r"PASSWORD|TOKEN|CREDS|PRIVATE|_KEY$", entry["name"]):
                    assert "secretKeyRef" in entry.get("valueFrom", {}), (name, entry)
            assert not any("@" in arg for arg in container.get("args", [])), (name, container["args"])


def test_values_that_would_leak_or_break_are_refused() -> None:
    cases = {
        "operator.replicas=2": "peering/enabled",  # two replicas need peering
        "operator.securityContext.readOnlyRootFilesystem=false": "readOnlyRootFilesystem",
        "operator.podSecurityContext.runAsNonRoot=false": "runAsNonRoot",
        "nats.auth.password=hunter2": "additional properties",
        "nats.enabled=false": "set nats.externalUrl",
        "nats.externalUrl=nats://user:pw@host:4222": "externalUrl",
        "rbac.scope=everything": "scope",
        "metrics.serviceMonitor.enabled=true,metrics.enabled=false": "needs metrics.enabled",
        "nats.auth.mode=jwt": "asyncrlhf nats-auth",
        "nats.auth.mode=tokens": "must be one of 'password', 'jwt'",
        "nats.tls.enabled=true": "nats.tls.secretName",
    }
    for setting, message in cases.items():
        result = run_helm("template", RELEASE, str(CHART), "--set", setting, check=False)
        assert result.returncode != 0, setting
        assert message in result.stderr, (setting, result.stderr)


def test_the_rendered_nats_config_runs_jetstream_and_refuses_strangers(tmp_path: Path) -> None:
    """Run a real nats-server on the chart's own nats.conf (store, ports and pid file moved to
    the test's temporary folder): wrong or no credentials are refused, the Secret's are accepted
    and JetStream works for them."""
    objects = render("default")
    config = next(o for o in by_kind(objects, "ConfigMap") if "nats.conf" in o["data"])["data"]["nats.conf"]
    secret = one(objects, "Secret")
    user, password = (base64.b64decode(secret["data"][k]).decode() for k in ("user", "password"))
    client, monitor = free_port(), free_port()
    config = (config.replace("store_dir: /data", f"store_dir: {tmp_path / 'store'}")
              .replace("/var/run/nats/nats.pid", str(tmp_path / "nats.pid"))
              .replace("0.0.0.0:4222", f"127.0.0.1:{client}").replace("0.0.0.0:8222", f"127.0.0.1:{monitor}"))
    (tmp_path / "nats.conf").write_text(config)
    env = {**os.environ, "POD_NAME": "nats-0", "NATS_USER": user, "NATS_PASSWORD": password}
    checked = subprocess.run([nats_server_binary(), "-c", str(tmp_path / "nats.conf"), "-t"],
                             env=env, capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    log = open(tmp_path / "nats.log", "wb")
    server = subprocess.Popen([nats_server_binary(), "-c", str(tmp_path / "nats.conf")], env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for_port(client, server, tmp_path / "nats.log")
        asyncio.run(_check_auth_and_jetstream(f"nats://127.0.0.1:{client}", user, password))
    finally:
        server.terminate()
        server.wait(10)
        log.close()


def _wait_for_port(port: int, server: subprocess.Popen, log: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, f"nats-server exited: {log.read_text()}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nats-server did not listen on {port}: {log.read_text()}")


async def _check_auth_and_jetstream(url: str, user: str, password: str) -> None:
    import nats
    from nats.errors import NoServersError

    for credentials in ({}, {"user": user, "password": "wrong" + password}):
        with pytest.raises((NoServersError, nats.errors.Error, OSError)):
            await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0,
                               allow_reconnect=False, **credentials)
    connection = await nats.connect(url, user=user, password=password, connect_timeout=5)
    try:
        jetstream = connection.jetstream()
        await jetstream.add_stream(name="CHART_TEST", subjects=["chart.test"])
        ack = await jetstream.publish("chart.test", b"rollout")
        assert ack.stream == "CHART_TEST" and ack.seq == 1
        info = await jetstream.account_info()
        assert info.limits.max_storage == -1 or info.limits.max_storage > 0
    finally:
        await connection.close()


# --------------------------------------------------------------------------- network policies


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_network_policies_select_the_real_pods_and_allow_only_the_bus_paths() -> None:
    objects = render("default")
    pods = {name: meta["labels"] for name, meta, _ in pod_specs(objects)}
    operator_labels = pods[f"{RELEASE}-asyncrlhf"]
    nats_labels = pods[f"{RELEASE}-asyncrlhf-nats"]
    operator_policy = one(objects, "NetworkPolicy", f"{RELEASE}-asyncrlhf-operator")["spec"]
    nats_policy = one(objects, "NetworkPolicy", f"{RELEASE}-asyncrlhf-nats")["spec"]
    assert _selects(operator_policy["podSelector"], operator_labels)
    assert not _selects(operator_policy["podSelector"], nats_labels)
    assert _selects(nats_policy["podSelector"], nats_labels)
    assert not _selects(nats_policy["podSelector"], operator_labels)
    assert set(operator_policy["policyTypes"]) == {"Ingress", "Egress"}
    (ingress,) = operator_policy["ingress"]
    assert ingress["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    to_nats = [rule for rule in operator_policy["egress"]
               if any(_selects(peer.get("podSelector", {"matchLabels": {"x": "y"}}), nats_labels)
                      for peer in rule.get("to", []))]
    assert to_nats and to_nats[0]["ports"] == [{"port": 4222, "protocol": "TCP"}]
    api = [rule for rule in operator_policy["egress"] if any("ipBlock" in p for p in rule.get("to", []))]
    assert {p["port"] for p in api[0]["ports"]} == {443, 6443}
    (nats_ingress,) = nats_policy["ingress"]
    assert nats_ingress["ports"] == [{"port": "client", "protocol": "TCP"}]
    peers = nats_ingress["from"]
    assert any(_selects(p.get("podSelector", {}), operator_labels) and "namespaceSelector" not in p
               for p in peers)
    job_peers = [p for p in peers if "namespaceSelector" in p]
    assert job_peers == [{"namespaceSelector": {},
                          "podSelector": {"matchLabels": {"app.kubernetes.io/managed-by": "asyncrlhf-operator"}}}]
    assert not any(p == {} or "ipBlock" in p for p in peers)


def test_network_policies_can_be_turned_off() -> None:
    assert not by_kind(render("no-network-policy"), "NetworkPolicy")


# --------------------------------------------------------------------------- metrics


def test_metrics_service_and_service_monitor_reach_the_operator_metrics_port() -> None:
    objects = render("service-monitor")
    service = one(objects, "Service", f"{RELEASE}-asyncrlhf-metrics")
    operator_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert all(operator_labels.get(k) == v for k, v in service["spec"]["selector"].items())
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics",
                                         "protocol": "TCP"}]
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert _selects(monitor["spec"]["selector"], service["metadata"]["labels"])
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics",
                                             "interval": "30s", "scrapeTimeout": "10s"}]
    assert not by_kind(render("default"), "ServiceMonitor")


# --------------------------------------------------------------------------- CRD


def test_chart_crd_is_byte_identical_to_the_generated_crd() -> None:
    assert CHART_CRD.is_file(), (
        f"{CHART_CRD.relative_to(REPO)} is missing: the chart must ship the CRD. Run "
        f"`cp {GENERATED_CRD.relative_to(REPO)} {CHART_CRD.relative_to(REPO)}`"
    )
    if not GENERATED_CRD.is_file():
        pytest.fail(f"{GENERATED_CRD.relative_to(REPO)} is missing: run `python -m asyncrlhf_operator.crd`")
    assert CHART_CRD.read_bytes() == GENERATED_CRD.read_bytes(), (
        "the chart's CRD differs from the generated one: run "
        f"`cp {GENERATED_CRD.relative_to(REPO)} {CHART_CRD.relative_to(REPO)}`"
    )


def test_rendered_crd_is_the_generated_crd_plus_chart_metadata() -> None:
    generated = yaml.safe_load(CHART_CRD.read_text())
    rendered = one(render("default"), "CustomResourceDefinition")
    assert rendered["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert rendered["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    for key in ("labels", "annotations"):
        generated["metadata"].pop(key, None)
        rendered["metadata"].pop(key)
    assert rendered == generated
    # The schema itself is copied verbatim, not re-serialised (which would print 3.0e-06 as 3e-06,
    # a string to YAML 1.1 readers).
    document = next(d for d in _render_text("default").split("\n---\n")
                    if "\nkind: CustomResourceDefinition\n" in d)
    spec = re.compile(r"^spec:[ \t]*\n", re.M)
    assert spec.split(document, 1)[1].rstrip() == spec.split(CHART_CRD.read_text(), 1)[1].rstrip()


def test_crd_switches() -> None:
    assert not by_kind(render("crds-off"), "CustomResourceDefinition")
    released = one(render("crds-not-kept"), "CustomResourceDefinition")
    assert "helm.sh/resource-policy" not in released["metadata"].get("annotations", {})


# --------------------------------------------------------------------------- values documentation


def test_every_value_is_documented_with_a_comment() -> None:
    """A value is documented by the comment directly above it, or above an ancestor (a comment on
    `resources:` documents the Kubernetes object below it as a whole)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    documented_ancestors: list[tuple[int, bool]] = []  # (indent, has a comment) of open sections
    for index, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][\w.-]*):(.*)$", line)
        if not match:
            continue
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3)
        while documented_ancestors and documented_ancestors[-1][0] >= indent:
            documented_ancestors.pop()
        commented = index > 0 and lines[index - 1].strip().startswith("#")
        inherited = any(flag for _, flag in documented_ancestors)
        if not rest.strip():  # a section: its children are documented by it or one by one
            documented_ancestors.append((indent, commented))
        elif not (commented or inherited):
            undocumented.append(f"values.yaml:{index + 1}: {key}")
    assert not undocumented, "values without a comment:\n" + "\n".join(undocumented)


def test_values_schema_matches_values_yaml() -> None:
    """values.yaml validates against values.schema.json and every value has a schema entry
    (the schema forbids unknown keys, so a value missing there could never be set)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(values)

    def walk(node: Any, schema_node: dict, path: str) -> Iterator[str]:
        if not isinstance(node, dict) or "properties" not in schema_node:
            return
        for key, value in node.items():
            if key not in schema_node["properties"]:
                if schema_node.get("additionalProperties") is False:
                    yield f"{path}{key}"
            else:
                yield from walk(value, schema_node["properties"][key], f"{path}{key}.")

    assert not list(walk(values, schema, "")), "values missing from values.schema.json"


# --------------------------------------------------------------------------- contract with the operator


def _planned_children() -> list[dict]:
    """What the operator creates for a job (its pure planning functions), or a loud failure."""
    from asyncrlhf import api
    from asyncrlhf_operator import plan

    job = api.AsyncRLHFJob.model_validate({"metadata": {"name": "demo", "namespace": "team-a"}})
    owner = plan.Owner(name="demo", namespace="team-a", uid="0000")
    default_url = f"nats://{RELEASE}-asyncrlhf-nats.{NAMESPACE}.svc.cluster.local:4222"
    backup = plan.volume_snapshot(job, owner, "demo-step-500")  # taken by the status timer when enabled
    queued = job.model_copy(update={"metadata": job.metadata.model_copy(update={"labels": {plan.QUEUE_LABEL: "q"}})})
    workload = plan.queued_workload(queued, owner, default_url)  # made for a job with a Kueue queue name
    return plan.desired_children(job, owner, default_url) + [backup, workload]


KIND_RESOURCES = {
    "ConfigMap": ("", "configmaps"), "PersistentVolumeClaim": ("", "persistentvolumeclaims"),
    "Service": ("", "services"), "ServiceAccount": ("", "serviceaccounts"),
    "Deployment": ("apps", "deployments"), "Job": ("batch", "jobs"),
    "NetworkPolicy": ("networking.k8s.io", "networkpolicies"),
    "VolumeSnapshot": ("snapshot.storage.k8s.io", "volumesnapshots"),
    "Workload": ("kueue.x-k8s.io", "workloads"),
}


def test_rbac_covers_every_child_the_operator_plans() -> None:
    granted = rbac_rules(one(render("default"), "ClusterRole"))
    for child in _planned_children():
        resource = KIND_RESOURCES.get(child["kind"])
        assert resource, f"the operator creates a {child['kind']}, which the chart's RBAC does not know"
        assert {"get", "create", "patch"} <= granted[resource], child["kind"]


def test_nats_admits_the_job_pods_the_operator_creates() -> None:
    nats_policy = one(render("default"), "NetworkPolicy", f"{RELEASE}-asyncrlhf-nats")["spec"]
    (ingress,) = nats_policy["ingress"]
    cross_namespace = [p for p in ingress["from"] if "namespaceSelector" in p]
    pods = list(pod_specs(_planned_children()))
    assert pods
    for name, meta, _ in pods:
        assert any(_selects(peer["podSelector"], meta["labels"]) for peer in cross_namespace), name


def _operator_api_calls() -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of every call the operator's own code makes through `Kube`,
    read from its source: get/delete with a literal (apiVersion, kind), apply of planned children."""
    from asyncrlhf_operator import kube

    verbs = {"get": ["get"], "delete": ["delete"], "apply": ["patch", "create"], "list": ["list"],
             "patch_status": ["patch"]}
    calls: set[tuple[str, str, str]] = set()
    for path in sorted((REPO / "operator" / "asyncrlhf_operator").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in verbs and ast.unparse(node.func.value).endswith("kube")):
                continue
            if node.func.attr == "apply" and "job_secret(" in ast.unparse(node):
                kinds = {("v1", "Secret")}  # jetstream.ensure_job_secret: the job's <job>-nats
            elif node.func.attr == "apply":
                kinds = {(c["apiVersion"], c["kind"]) for c in _planned_children()}
            else:
                literal = [a for a in node.args[:2] if isinstance(a, ast.Constant)]
                kinds = {(literal[0].value, literal[1].value)} if len(literal) == 2 else \
                    {_api_kind_of(path, node)}
            for api_version, kind in kinds:
                group = api_version.rpartition("/")[0]
                suffix = "/status" if node.func.attr == "patch_status" else ""
                for verb in verbs[node.func.attr]:
                    calls.add((group, kube.PLURALS[(api_version, kind)] + suffix, verb))
    return calls


def _api_kind_of(path: Path, node: ast.Call) -> tuple[str, str]:
    """Calls like kube.delete(api.API_VERSION, api.KIND, ...) name the custom resource."""
    from asyncrlhf import api

    text = ast.unparse(node)
    if "api.API_VERSION" in text and "api.KIND" in text:
        return api.API_VERSION, api.KIND
    raise AssertionError(f"{path.name}: cannot tell which kind `{text}` touches; use literals")


# What kopf itself does: list and watch the handled resource, patch finalizers and annotations,
# patch /status, post core/v1 Events; in cluster scope also list and watch CRDs.
KOPF_CALLS = {
    ("asyncrlhf.dev", "asyncrlhfjobs", "list"), ("asyncrlhf.dev", "asyncrlhfjobs", "watch"),
    ("asyncrlhf.dev", "asyncrlhfjobs", "patch"), ("asyncrlhf.dev", "asyncrlhfjobs/status", "patch"),
    ("", "events", "create"),
    # Not a call: setting ownerReferences[].blockOwnerDeletion needs it under the
    # OwnerReferencesPermissionEnforcement admission plugin.
    ("asyncrlhf.dev", "asyncrlhfjobs/finalizers", "update"),
}


def test_rbac_is_exactly_what_the_operator_code_calls() -> None:
    """Every call the code makes is granted, and nothing is granted that no code calls (beyond
    `get` on what it writes, the read that goes with owning an object)."""
    needed = _operator_api_calls() | KOPF_CALLS
    granted = {(g, r, v) for (g, r), verbs in JWT_RULES.items() for v in verbs}  # everything the code can do
    assert needed - granted == set(), "the operator calls these but the chart does not grant them"
    extra = {(g, r, v) for g, r, v in granted - needed if v != "get"}
    assert extra == set(), "the chart grants these but no operator code calls them"
    assert {(g, r) for g, r, _ in granted} == {(g, r) for g, r, _ in needed}


# --------------------------------------------------------------------------- the install guide


INSTALL_GUIDE = REPO / "docs" / "install.md"


def _code_blocks(language: str) -> list[str]:
    text = INSTALL_GUIDE.read_text()
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S)


def test_install_guide_helm_settings_render() -> None:
    """Every `--set` the guide shows is a real value the schema accepts (one helm run per row)."""
    text = INSTALL_GUIDE.read_text()
    rows = [re.findall(r"--set ([\w.\-]+=\S+?)(?=`| |$)", line) for line in text.splitlines()]
    rows = [row for row in rows if row]
    assert len(rows) >= 5, rows
    for settings in rows:
        args = [arg for setting in settings for arg in ("--set", setting)]
        result = run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args, check=False)
        assert result.returncode == 0, (settings, result.stderr)


def test_install_guide_kustomize_overlay_yields_a_valid_job(tmp_path: Path) -> None:
    """The overlay of step 4, run through the real `kubectl kustomize` on the real example."""
    from asyncrlhf import api
    from helm_tools import kubectl_binary

    script = next(block for block in _code_blocks("bash") if "kustomization.yaml" in block)
    overlay = re.search(r"<<'EOF'\n(.*?)^EOF", script, flags=re.M | re.S).group(1)
    example = re.search(r"cp (examples/\S+) my-job/", script).group(1)
    (tmp_path / "my-job").mkdir()
    (tmp_path / "my-job" / "kustomization.yaml").write_text(overlay)
    shutil.copy(REPO / example, tmp_path / "my-job")
    result = subprocess.run([str(kubectl_binary()), "kustomize", str(tmp_path / "my-job")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    (manifest,) = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    job = api.AsyncRLHFJob.model_validate(manifest)
    assert job.metadata.namespace == "rlhf"
    assert job.spec.image.endswith("-cpu") and job.spec.nats.credentials_secret == "nats-credentials"


def test_install_guide_manifests_pass_the_official_schema() -> None:
    manifests = [yaml.safe_load(block) for block in _code_blocks("yaml")]
    assert manifests
    for manifest in manifests:
        assert not schema_errors(manifest, KUBE_VERSIONS[-1])
        assert manifest["spec"]["securityContext"]["runAsNonRoot"] is True  # works under PSA restricted


# --------------------------------------------------------------------------- workload metrics (issue 13)


def test_the_workloads_pod_monitor_scrapes_the_jobs_pods_by_their_metrics_port() -> None:
    assert not by_kind(render("default"), "PodMonitor") and not [
        o for o in by_kind(render("default"), "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")]
    monitor = one(render("workload-metrics"), "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"matchNames": ["team-a"]}  # the namespace the operator watches
    assert spec["podMetricsEndpoints"] == [{"port": "metrics", "path": "/metrics", "honorLabels": True,
                                            "interval": "30s", "scrapeTimeout": "10s"}]
    from asyncrlhf_operator import plan  # the operator's own pods match its selector
    from asyncrlhf.manifest import load_manifest

    job = load_manifest(str(REPO / "examples" / "local-tiny.yaml"))
    owner = plan.Owner(name=job.metadata.name, namespace="team-a", uid="uid")
    children = plan.desired_children(job, owner, "nats://nats:4222", admission=plan.gate(job, None))
    pods = [c["spec"]["template"] for c in children if c["kind"] in ("Job", "Deployment")]
    assert len(pods) == 2
    for pod in pods:
        labels = pod["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in spec["selector"]["matchLabels"].items())
        assert labels["app.kubernetes.io/component"] in spec["selector"]["matchExpressions"][0]["values"]
        assert {"name": "metrics", "containerPort": 9410} in pod["spec"]["containers"][0]["ports"]
    assert "any" in one(render_values({"metrics": {"podMonitor": {"enabled": True}}}), "PodMonitor")[
        "spec"]["namespaceSelector"]


def render_values(overrides: dict[str, Any]) -> list[dict[str, Any]]:
    text = run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "-f", values_file(overrides)).stdout
    return [doc for doc in yaml.safe_load_all(text) if doc]


def test_the_dashboard_names_only_metrics_the_workloads_export() -> None:
    from asyncrlhf.checkpoints import LearnerState
    from asyncrlhf.generator import GeneratorState
    from asyncrlhf.telemetry import GeneratorTelemetry, LearnerTelemetry, exported_names

    config = one(render("workload-metrics"), "ConfigMap", f"{RELEASE}-asyncrlhf-dashboard")
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config["data"]["asyncrlhf-jobs.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    named = {name for e in exprs for name in re.findall(r"\basyncrlhf_[a-z_]+", e)}
    exported = exported_names(LearnerTelemetry("j", "ns", LearnerState())) | exported_names(
        GeneratorTelemetry("j", "ns", "g", GeneratorState()))
    assert named and named <= exported, sorted(named - exported)
    assert len(dashboard["panels"]) >= 10 and len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
