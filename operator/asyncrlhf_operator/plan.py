"""Desired children of one AsyncRLHFJob: pure functions from the validated spec to manifests.

Nothing here talks to the API server; `kube.py` applies what these functions return, so the
whole shape of what the operator creates is testable with tables and the official schemas.

Children (all labelled app.kubernetes.io/{name,instance,component,managed-by}, all owned by
the job except a retained snapshot volume, which must outlive it):

- ServiceAccount `<job>-workload`: no API token mounted; the workloads never call the API.
- ConfigMap `<job>-config`: the rendered spec at /etc/asyncrlhf/job.yaml. Fields the operator
  acts on at run time (generator.replicas, suspend, ttlSecondsAfterFinished) are left out, so
  scaling or suspending does not change the config and restarts nothing.
- PVC `<job>-snapshots` (unless spec.weightSync.volumeClaim): snapshots and checkpoints.
- Service `<job>-learner` (headless): stable DNS names for multi-node rendezvous.
- NetworkPolicy `<job>-workload`: egress to NATS and DNS (and HTTPS when a hub model is
  named), traffic among learner pods; no other ingress.
- Job `<job>-learner` (Indexed): one pod per learner node. backoffLimit 0 with a
  podFailurePolicy that ignores disruptions: any real failure fails the whole Job, and the
  operator recreates it (all ranks at once, resuming from the checkpoint) up to
  spec.learner.backoffLimit times. Gang restarts are what distributed training needs, and
  one counter (status.restarts) is easier to reason about than two.
- Deployment `<job>-generator`: stateless generators, scaled freely.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urlsplit

import yaml

from asyncrlhf import api

MANAGER = "asyncrlhf-operator"
CONFIG_DIR = "/etc/asyncrlhf"
CONFIG_KEY = "job.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_KEY}"
SNAPSHOT_DIR = "/snapshots"
NATS_CREDS_DIR = "/var/run/asyncrlhf/nats"
RENDEZVOUS_PORT = 29500
DEFAULT_NATS_PORT = 4222
RUN_AS = 1000
CONFIG_HASH = f"{api.GROUP}/config-hash"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
GPU = "nvidia.com/gpu"
# Spec fields the operator applies at run time; they are not part of the workloads' config.
RUNTIME_FIELDS = (("generator", "replicas"), ("suspend",), ("ttlSecondsAfterFinished",),
                  ("weightSync", "volumeSnapshots"))


@dataclass(frozen=True)
class Owner:
    """The job object the children belong to."""

    name: str
    namespace: str
    uid: str


@dataclass(frozen=True)
class Names:
    job: str

    @property
    def config(self) -> str:
        return f"{self.job}-config"

    @property
    def snapshots(self) -> str:
        return f"{self.job}-snapshots"

    @property
    def learner(self) -> str:  # the Job and its headless Service share the name
        return f"{self.job}-learner"

    @property
    def generator(self) -> str:
        return f"{self.job}-generator"

    @property
    def workload(self) -> str:  # ServiceAccount and NetworkPolicy
        return f"{self.job}-workload"


# ---------------------------------------------------------------------------------------------
# Metadata


def selector(owner: Owner, component: Optional[str] = None) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": "asyncrlhf", "app.kubernetes.io/instance": owner.name}
    if component:
        labels["app.kubernetes.io/component"] = component
    return labels


def labels(owner: Owner, component: str) -> dict[str, str]:
    return {**selector(owner, component), "app.kubernetes.io/managed-by": MANAGER}


def owner_reference(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION, "kind": api.KIND, "name": owner.name, "uid": owner.uid,
        "controller": True, "blockOwnerDeletion": True,
    }


def metadata(owner: Owner, name: str, component: str, *, owned: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": owner.namespace, "labels": labels(owner, component)}
    if owned:
        meta["ownerReferences"] = [owner_reference(owner)]
    return meta


# ---------------------------------------------------------------------------------------------
# Config


def rendered_config(job: api.AsyncRLHFJob) -> str:
    """The job manifest the workloads read, defaults filled in, run-time fields left out."""
    manifest = job.to_manifest()
    manifest.pop("status", None)
    manifest["metadata"] = {"name": job.metadata.name, "namespace": job.metadata.namespace}
    for path in RUNTIME_FIELDS:
        parent = manifest["spec"]
        for key in path[:-1]:
            parent = parent[key]
        parent.pop(path[-1], None)
    return yaml.safe_dump(manifest, sort_keys=False)


def config_hash(job: api.AsyncRLHFJob) -> str:
    return hashlib.sha256(rendered_config(job).encode()).hexdigest()[:16]


def config_map(job: api.AsyncRLHFJob, owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": metadata(owner, Names(owner.name).config, "config"),
        "data": {CONFIG_KEY: rendered_config(job)},
    }


# ---------------------------------------------------------------------------------------------
# Storage, identity, network


def snapshot_claim_name(job: api.AsyncRLHFJob, owner: Owner) -> str:
    return job.spec.weight_sync.volume_claim or Names(owner.name).snapshots


def snapshot_pvc(job: api.AsyncRLHFJob, owner: Owner) -> Optional[dict[str, Any]]:
    """The PVC to create, or None when the spec names an existing claim."""
    sync = job.spec.weight_sync
    if sync.volume_claim:
        return None
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": sync.size}},
    }
    if sync.storage_class:
        spec["storageClassName"] = sync.storage_class
    # A retained volume has no owner: garbage collection would otherwise delete it with the job.
    meta = metadata(owner, Names(owner.name).snapshots, "snapshots", owned=not sync.retain_volume)
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}


def volume_snapshot(job: api.AsyncRLHFJob, owner: Owner, name: str) -> dict[str, Any]:
    """A CSI VolumeSnapshot of the job's volume. The checkpoints on it are crash-consistent (each
    is renamed into place, then LATEST is replaced), so any snapshot restores to a resumable one."""
    settings = job.spec.weight_sync.volume_snapshots
    spec: dict[str, Any] = {"source": {"persistentVolumeClaimName": snapshot_claim_name(job, owner)}}
    if settings.class_name:
        spec["volumeSnapshotClassName"] = settings.class_name
    meta = metadata(owner, name, "backup", owned=not job.spec.weight_sync.retain_volume)
    return {"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot", "metadata": meta, "spec": spec}


def volume_snapshot_plan(job: api.AsyncRLHFJob, step: int, taken: list[str]) -> tuple[Optional[str], list[str], list[str]]:
    """(the VolumeSnapshot to take now or None, those to delete, the names kept afterwards, oldest
    first) once the learner is at `step`, given `taken` (from .status). One per multiple of
    everySteps, named after it, so a repeated pass takes nothing twice."""
    settings = job.spec.weight_sync.volume_snapshots
    if not settings.enabled or step < settings.every_steps:
        return None, [], list(taken)
    due = f"{job.metadata.name}-step-{step // settings.every_steps * settings.every_steps}"
    new = None if due in taken else due
    names = list(taken) + ([new] if new else [])
    return new, names[: -settings.keep], names[-settings.keep:]


def service_account(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": metadata(owner, Names(owner.name).workload, "workload"),
        "automountServiceAccountToken": False,
    }


def learner_service(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": metadata(owner, Names(owner.name).learner, "learner"),
        "spec": {
            "clusterIP": "None",
            "selector": selector(owner, "learner"),
            # Ranks must find each other before any of them is ready.
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT,
                       "protocol": "TCP"}],
        },
    }


def nats_url(job: api.AsyncRLHFJob, default_url: str) -> str:
    return job.spec.nats.url or default_url


def nats_ports(url: str) -> list[int]:
    """Ports of every server in a (comma-separated) NATS URL."""
    ports = set()
    for server in url.split(","):
        server = server.strip()
        if server:
            parsed = urlsplit(server if "://" in server else f"nats://{server}")
            ports.add(parsed.port or DEFAULT_NATS_PORT)
    return sorted(ports) or [DEFAULT_NATS_PORT]


def needs_hub(job: api.AsyncRLHFJob) -> bool:
    """Whether some model or dataset is a hub id (downloaded at start) rather than a local path."""
    spec = job.spec
    refs = [spec.model.policy, spec.model.reference, spec.model.tokenizer, spec.task.reward.model,
            spec.task.reward.onepass.feature_model]
    if spec.task.prompts.source == "dataset":
        refs.append(spec.task.prompts.name)
    return any(r and not r.startswith(("/", api.BUILTIN_MODEL_PREFIX)) for r in refs)


def network_policy(job: api.AsyncRLHFJob, owner: Owner, default_url: str) -> dict[str, Any]:
    learners = {"podSelector": {"matchLabels": selector(owner, "learner")}}
    dns = [{"protocol": proto, "port": 53} for proto in ("UDP", "TCP")]
    nats = [{"protocol": "TCP", "port": port} for port in nats_ports(nats_url(job, default_url))]
    egress: list[dict[str, Any]] = [{"ports": dns}, {"ports": nats}, {"to": [learners]}]
    if needs_hub(job):
        egress.append({"ports": [{"protocol": "TCP", "port": 443}]})
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": metadata(owner, Names(owner.name).workload, "workload"),
        "spec": {
            "podSelector": {"matchLabels": selector(owner)},
            "policyTypes": ["Ingress", "Egress"],
            # Learner ranks talk to each other on rendezvous and collective (NCCL/gloo) ports,
            # which are chosen at random: allow all ports, but only among this job's learners.
            "ingress": [{"from": [learners]}],
            "egress": egress,
        },
    }


# ---------------------------------------------------------------------------------------------
# Pods


def _resources(cpu: str, memory: str, gpus: int) -> dict[str, Any]:
    limits: dict[str, Any] = {"memory": memory}
    if gpus:
        limits[GPU] = gpus
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": limits}


def _env(job: api.AsyncRLHFJob, default_url: str) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "ASYNCRLHF_NATS_URL", "value": nats_url(job, default_url)},
        {"name": "ASYNCRLHF_SNAPSHOT_DIR", "value": SNAPSHOT_DIR},
        {"name": "ASYNCRLHF_CACHE", "value": "/cache/asyncrlhf"},
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": "/cache"},
        {"name": "HF_HOME", "value": "/cache/huggingface"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    secret = job.spec.nats.credentials_secret
    if secret:
        for var, key in (("ASYNCRLHF_NATS_USER", "user"), ("ASYNCRLHF_NATS_PASSWORD", "password")):
            env.append({"name": var, "valueFrom": {
                "secretKeyRef": {"name": secret, "key": key, "optional": True}}})
        env.append({"name": "ASYNCRLHF_NATS_CREDS", "value": f"{NATS_CREDS_DIR}/creds"})
    return env


def _volumes(job: api.AsyncRLHFJob, owner: Owner) -> tuple[list[dict], list[dict]]:
    volumes = [
        {"name": "config", "configMap": {"name": Names(owner.name).config}},
        {"name": "snapshots", "persistentVolumeClaim": {"claimName": snapshot_claim_name(job, owner)}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "cache", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    mounts = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "snapshots", "mountPath": SNAPSHOT_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": "/cache"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    if job.spec.nats.credentials_secret:
        volumes.append({"name": "nats-credentials", "secret": {
            "secretName": job.spec.nats.credentials_secret, "optional": True,
            "items": [{"key": "creds", "path": "creds"}]}})
        mounts.append({"name": "nats-credentials", "mountPath": NATS_CREDS_DIR, "readOnly": True})
    return volumes, mounts


def _pod_spec(
    job: api.AsyncRLHFJob, owner: Owner, *, role: str, resources: dict, env: list, gpus: int
) -> dict[str, Any]:
    volumes, mounts = _volumes(job, owner)
    container = {
        "name": role,
        "image": job.spec.image,
        "command": ["asyncrlhf"],
        "args": [role, "--config", CONFIG_PATH],
        "env": env,
        "resources": resources,
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    spec: dict[str, Any] = {
        "serviceAccountName": Names(owner.name).workload,
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if gpus:
        spec["tolerations"] = [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]
    return spec


def _template(job, owner, component: str, pod_spec: dict) -> dict[str, Any]:
    return {
        "metadata": {"labels": labels(owner, component), "annotations": {CONFIG_HASH: config_hash(job)}},
        "spec": pod_spec,
    }


def learner_gpus(job: api.AsyncRLHFJob) -> int:
    learner = job.spec.learner
    return learner.gpus_per_node


def learner_job(job: api.AsyncRLHFJob, owner: Owner, default_url: str) -> dict[str, Any]:
    learner, names = job.spec.learner, Names(owner.name)
    gpus = learner_gpus(job)
    rank = {"valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}}}
    env = _env(job, default_url) + [
        {"name": "RANK", **rank},
        {"name": "NODE_RANK", **rank},
        {"name": "WORLD_SIZE", "value": str(learner.nodes)},
        {"name": "NNODES", "value": str(learner.nodes)},
        {"name": "NPROC_PER_NODE", "value": str(gpus or learner.processes_per_node)},
        {"name": "MASTER_ADDR", "value": f"{names.learner}-0.{names.learner}"},
        {"name": "MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
    ]
    resources = _resources(learner.resources.cpu, learner.resources.memory, gpus)
    pod = _pod_spec(job, owner, role="learner", resources=resources, env=env, gpus=gpus)
    pod["containers"][0]["ports"] = [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}]
    pod.update(subdomain=names.learner, restartPolicy="Never")
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": metadata(owner, names.learner, "learner"),
        "spec": {
            "completionMode": "Indexed",
            "completions": learner.nodes,
            "parallelism": learner.nodes,
            "backoffLimit": 0,
            "podFailurePolicy": {"rules": [
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]},
            "suspend": job.spec.suspend,
            "template": _template(job, owner, "learner", pod),
        },
    }


def generator_replicas(job: api.AsyncRLHFJob, *, finished: bool = False) -> int:
    return 0 if job.spec.suspend or finished else job.spec.generator.replicas


def generator_deployment(
    job: api.AsyncRLHFJob, owner: Owner, default_url: str, *, finished: bool = False
) -> dict[str, Any]:
    generator = job.spec.generator
    env = _env(job, default_url) + [
        {"name": "GENERATOR_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    resources = _resources(generator.resources.cpu, generator.resources.memory, generator.resources.gpus)
    pod = _pod_spec(job, owner, role="generator", resources=resources, env=env,
                    gpus=generator.resources.gpus)
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": metadata(owner, Names(owner.name).generator, "generator"),
        "spec": {
            "replicas": generator_replicas(job, finished=finished),
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector(owner, "generator")},
            "template": _template(job, owner, "generator", pod),
        },
    }


def desired_children(
    job: api.AsyncRLHFJob, owner: Owner, default_url: str, *, finished: bool = False
) -> list[dict[str, Any]]:
    """Every child, in creation order (what pods mount exists before the pods)."""
    children = [service_account(owner), config_map(job, owner), snapshot_pvc(job, owner),
                learner_service(owner), network_policy(job, owner, default_url),
                learner_job(job, owner, default_url),
                generator_deployment(job, owner, default_url, finished=finished)]
    return [child for child in children if child is not None]
