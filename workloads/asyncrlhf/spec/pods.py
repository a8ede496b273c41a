"""Pod customisation: `generator.podTemplate` / `learner.podTemplate`, the hub token, the model cache.

A pod template is a *partial* Kubernetes PodTemplateSpec merged over the pod the operator builds
(strategic-merge semantics: maps merged, lists of named things merged by name). Only the fields
listed here may be set; the CRD's schema for them is generated from the official Kubernetes
OpenAPI types (`asyncrlhf_operator.podschema`). What the operator must own to keep a job working
(the command, the config and snapshot mounts, the bus's environment, the selectors' labels, the
CPU/memory/GPU that `resources` sets) is refused here, with the field and what to set instead.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from .base import SpecModel, json_problems

# Kubernetes' resource.Quantity syntax (the pattern controller-gen puts on quantity fields)
QUANTITY_BODY = (r"(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
                 r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?")
QUANTITY = f"^{QUANTITY_BODY}$"
POD_FIELDS = (
    "nodeSelector", "tolerations", "affinity", "topologySpreadConstraints", "priorityClassName",
    "schedulerName", "runtimeClassName", "imagePullSecrets", "securityContext", "volumes", "containers",
)
CONTAINER_FIELDS = ("name", "env", "envFrom", "volumeMounts", "resources")
# Environment the operator sets (the workloads' contract, torch's rendezvous, the cache layout).
OWNED_ENV = frozenset({
    "POD_NAME", "POD_NAMESPACE", "GENERATOR_ID", "RANK", "NODE_RANK", "WORLD_SIZE", "NNODES",
    "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "HOME", "XDG_CACHE_HOME", "HF_HOME",
})
OWNED_ENV_PREFIX = "ASYNCRLHF_"
OWNED_VOLUMES = frozenset({"config", "snapshots", "nats-credentials", "nats-job", "nats-tls"})
OWNED_MOUNT_PATHS = frozenset({"/etc/asyncrlhf", "/snapshots", "/var/run/asyncrlhf/nats",
                               "/var/run/asyncrlhf/nats-job", "/var/run/asyncrlhf/nats-tls"})
OWNED_RESOURCES = {"cpu": "resources.cpu", "memory": "resources.memory", "nvidia.com/gpu": "the GPU count"}
OWNED_LABEL_PREFIX = "app.kubernetes.io/"


class PodTemplateMetadata(SpecModel):
    """Labels and annotations added to the pods (app.kubernetes.io/* labels are the operator's)."""

    labels: dict[str, str] = Field(default_factory=dict, description="Extra pod labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Extra pod annotations.")

    @field_validator("labels")
    @classmethod
    def _no_owned_labels(cls, labels: dict[str, str]) -> dict[str, str]:
        owned = sorted(k for k in labels if k.startswith(OWNED_LABEL_PREFIX))
        if owned:
            raise ValueError(f"labels {owned}: {OWNED_LABEL_PREFIX}* labels select the job's pods and are "
                             "set by the operator; use another prefix")
        return labels


class PodTemplate(SpecModel):
    """A partial PodTemplateSpec merged over the operator's pod (strategic merge: maps merged, lists
    of named things merged by name, tolerations and envFrom appended)."""

    metadata: PodTemplateMetadata = Field(default_factory=PodTemplateMetadata, description="Pod metadata.")
    spec: dict[str, Any] = Field(
        default_factory=dict, json_schema_extra={"x-asyncrlhf-kubernetes": "PodSpec"},
        description="Pod spec fields: " + ", ".join(POD_FIELDS) + "; in `containers`, only the "
        "workload's container (`generator` or `learner`) with " + ", ".join(CONTAINER_FIELDS[1:]) + ".",
    )

    @field_validator("spec")
    @classmethod
    def _only_what_the_operator_does_not_own(cls, spec: dict[str, Any]) -> dict[str, Any]:
        problems = json_problems(spec) or pod_spec_problems(spec)
        if problems:
            raise ValueError("; ".join(problems))
        return spec


def pod_spec_problems(spec: dict[str, Any]) -> list[str]:
    """Why a pod template's spec cannot be merged (empty when it can), each with its field."""
    problems = [f"{k}: not supported in a pod template (supported: {', '.join(POD_FIELDS)})"
                for k in spec if k not in POD_FIELDS]
    context = _mapping(spec, "securityContext", "securityContext", problems)
    if context.get("runAsNonRoot") is False or context.get("runAsUser") == 0:
        problems.append("securityContext: the workloads run as non-root; set runAsUser to a non-zero uid")
    for i, volume in enumerate(_items(spec, "volumes")):
        if volume.get("name") in OWNED_VOLUMES:
            problems.append(f"volumes[{i}]: volume {volume.get('name')!r} is the operator's; use another name")
    for i, container in enumerate(_items(spec, "containers")):
        problems += _container_problems(container, f"containers[{i}]")
    return problems


def _mapping(owner: dict[str, Any], key: str, where: str, problems: list[str]) -> dict[str, Any]:
    """owner[key] when it is a mapping (or absent: {}); else {} and a problem naming the field."""
    value = owner.get(key)
    if value is None or isinstance(value, dict):
        return value or {}
    problems.append(f"{where}: must be a mapping, got {type(value).__name__}")
    return {}


def _items(spec: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = spec.get(key) or []
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _container_problems(container: dict[str, Any], where: str) -> list[str]:
    if container.get("name") not in ("generator", "learner"):
        return [f"{where}.name: only the workload's container ('generator' or 'learner') can be customised"]
    problems = [f"{where}.{k}: owned by the operator (supported: {', '.join(CONTAINER_FIELDS)})"
                for k in container if k not in CONTAINER_FIELDS]
    for i, var in enumerate(_items(container, "env")):
        name = str(var.get("name", ""))
        if name in OWNED_ENV or name.startswith(OWNED_ENV_PREFIX):
            problems.append(f"{where}.env[{i}]: {name} is set by the operator")
    for i, mount in enumerate(_items(container, "volumeMounts")):
        if mount.get("mountPath") in OWNED_MOUNT_PATHS or mount.get("name") in OWNED_VOLUMES:
            problems.append(f"{where}.volumeMounts[{i}]: {mount.get('mountPath')} is mounted by the operator")
    resources = _mapping(container, "resources", f"{where}.resources", problems)
    for part in ("requests", "limits"):
        for key in _mapping(resources, part, f"{where}.resources.{part}", problems):
            if key in OWNED_RESOURCES:
                problems.append(f"{where}.resources.{part}.{key}: set the job's {OWNED_RESOURCES[key]} instead")
    return problems


class SecretKey(SpecModel):
    """A key of a Secret in the job's namespace."""

    name: str = Field("", max_length=253, description="Secret name; empty = none.")
    key: str = Field("token", min_length=1, max_length=253, description="Key in the Secret.")


AccessMode = Literal["ReadWriteMany", "ReadWriteOnce"]


class ModelCacheSpec(SpecModel):
    """Where the pods keep downloaded models (the Hugging Face cache, mounted at /cache)."""

    claim_name: str = Field(
        "", max_length=253,
        description="Existing PVC to use as the cache (shared by jobs); empty = `size` decides.",
    )
    size: str = Field(
        "", pattern=f"^({QUANTITY_BODY})?$",
        description="Create a PVC `<job>-model-cache` of this size (deleted with the job); "
        "empty and no claimName = an emptyDir (every pod downloads again).",
    )
    storage_class: str = Field("", max_length=253, description="Storage class of the created PVC; empty = default.")
    access_mode: AccessMode = Field(
        "ReadWriteMany",
        description="Access mode of the created PVC: ReadWriteMany when pods run on several nodes.",
    )
