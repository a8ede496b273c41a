"""The workloads: the learner (Indexed Job) and the generators (Deployment), and their pod spec.

Both run the same image and command (`asyncrlhf learner|generator --config ...`) with the same
hardened pod: non-root, read-only root filesystem, no API token, the config, the snapshot volume
and scratch space mounted. The environment variables are the workloads' contract
(`asyncrlhf.workload_env`), spelled there once; the rendezvous variables are torch's.

The learner Job has backoffLimit 0 and a podFailurePolicy that ignores disruptions: any real
failure fails the whole Job, and the operator recreates it (all ranks at once, resuming from
the checkpoint) up to spec.learner.backoffLimit times.
"""

from __future__ import annotations

from typing import Any, Optional

from asyncrlhf import api, workload_env

from .config import CONFIG_DIR, CONFIG_HASH, CONFIG_PATH, config_hash
from .merge import strategic_merge
from .meta import Names, Owner, labels, metadata, selector
from .natsaccess import NATS_CREDS_DIR, nats_env, nats_volumes  # noqa: F401 (NATS_CREDS_DIR: plan's API)
from .network import RENDEZVOUS_PORT, nats_url
from .volumes import model_cache_claim_name, snapshot_claim_name

SNAPSHOT_DIR = "/snapshots"
RUN_AS = 1000
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
GPU = "nvidia.com/gpu"
HF_TOKEN = "HF_TOKEN"
# A generator's probes (asyncrlhf.probes, its own port: metrics can be off). Startup: the engine
# loads before /livez answers; a 70B model is 140 GB in bf16, ~1,400 s at 100 MB/s (a first pull
# from the hub or a slow network volume), plus ~5 min of vLLM compilation and CUDA graph capture:
# ~1,700 s, x1.5 margin -> 270 tries x 10 s = 45 min. Liveness: 6 x 10 s of failures (the endpoint
# itself already waits out a stalled loop for max(10 s, ackWaitSeconds) and generation for its hold
# limit), so a GC pause or a slow answer never kills a generator; a SIGSTOP'd one stops answering.
PROBE_PERIOD_SECONDS, STARTUP_FAILURES, LIVENESS_FAILURES = 10, 270, 6
SEARCHER_LABEL = f"{api.GROUP}/searcher"  # the TBA searcher group of a generator pod


def _resources(cpu: str, memory: str, gpus: int) -> dict[str, Any]:
    limits: dict[str, Any] = {"memory": memory}
    if gpus:
        limits[GPU] = gpus
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": limits}


def _env(job: api.AsyncRLHFJob, default_url: str) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": workload_env.NATS_URL, "value": nats_url(job.spec.nats, default_url)},
        {"name": workload_env.SNAPSHOT_DIR, "value": SNAPSHOT_DIR},
        {"name": workload_env.CACHE, "value": "/cache/asyncrlhf"},
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": "/cache"},
        {"name": "HF_HOME", "value": "/cache/huggingface"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    token = job.spec.model.token_secret
    if token.name:
        env.append({"name": HF_TOKEN, "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}}})
    return env + nats_env(job)


def _reward_env(job: api.AsyncRLHFJob) -> list[dict[str, Any]]:
    """Generators: each http reward's credential from its Secret, under the variable it reads."""
    return [{"name": http.auth.env, "valueFrom": {"secretKeyRef": {"name": http.auth.secret.name,
                                                                     "key": http.auth.secret.key}}}
            for http in job.spec.task.reward.http_rewards() if http.auth.secret.name]


def _reward_code(job: api.AsyncRLHFJob) -> tuple[list[dict], list[dict]]:
    """Generators: the ConfigMap with the job's python reward modules, where they import from."""
    name = job.spec.task.reward.code_config_map
    if not name:
        return [], []
    return ([{"name": "reward-code", "configMap": {"name": name}}],
            [{"name": "reward-code", "mountPath": api.REWARD_CODE_DIR, "readOnly": True}])


def _volumes(job: api.AsyncRLHFJob, owner: Owner) -> tuple[list[dict], list[dict]]:
    volumes = [
        {"name": "config", "configMap": {"name": Names(owner.name).config}},
        {"name": "snapshots", "persistentVolumeClaim": {"claimName": snapshot_claim_name(job, owner)}},
        {"name": "tmp", "emptyDir": {}},
        _cache_volume(job, owner),
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    mounts = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "snapshots", "mountPath": SNAPSHOT_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": "/cache"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    nats_volumes_, nats_mounts = nats_volumes(job)
    return volumes + nats_volumes_, mounts + nats_mounts


def _cache_volume(job: api.AsyncRLHFJob, owner: Owner) -> dict[str, Any]:
    """/cache: the job's model cache PVC when it has one, else scratch space."""
    claim = model_cache_claim_name(job, owner)
    return {"name": "cache", **({"persistentVolumeClaim": {"claimName": claim}} if claim else {"emptyDir": {}})}


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
        # a container that fails leaves its last log lines as its termination message: the
        # workloads print `error: ...` (what to fix) before exiting 2, and health.py quotes it
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if job.spec.metrics.port:  # /metrics (asyncrlhf.telemetry); a PodMonitor scrapes the port named `metrics`
        container["ports"] = [{"name": "metrics", "containerPort": job.spec.metrics.port}]
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


def _template(job: api.AsyncRLHFJob, owner: Owner, component: str, pod_spec: dict,
              custom: api.PodTemplate) -> dict[str, Any]:
    """The pod template: the operator's pod with the job's podTemplate merged over it (what the
    operator owns is refused by the spec's validation, so the merge cannot override it)."""
    return {
        "metadata": {"labels": {**custom.metadata.labels, **labels(owner, component)},
                     "annotations": {**custom.metadata.annotations, CONFIG_HASH: config_hash(job)}},
        "spec": strategic_merge(pod_spec, custom.spec),
    }


def learner_job(job: api.AsyncRLHFJob, owner: Owner, default_url: str, *, held: bool = False) -> dict[str, Any]:
    """The learner Job; suspended when the spec says so or Kueue holds the job (`held`)."""
    learner, names = job.spec.learner, Names(owner.name)
    gpus = learner.gpus_per_node
    rank = {"valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}}}
    env = _env(job, default_url) + [
        {"name": "RANK", **rank},
        {"name": "NODE_RANK", **rank},
        {"name": "WORLD_SIZE", "value": str(learner.nodes)},
        {"name": "NNODES", "value": str(learner.nodes)},
        {"name": "NPROC_PER_NODE", "value": str(gpus or learner.processes_per_node)},
        {"name": "MASTER_ADDR", "value": f"{names.learner}-0.{names.learner}"},
        {"name": "MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
        {"name": workload_env.JOB_UID, "value": owner.uid},  # what it finds on the bus and volume must be its own
    ]
    resources = _resources(learner.resources.cpu, learner.resources.memory, gpus)
    pod = _pod_spec(job, owner, role="learner", resources=resources, env=env, gpus=gpus)
    pod["containers"][0]["ports"] = [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}] + \
        pod["containers"][0].get("ports", [])
    if job.spec.tracking.credentials_secret:  # WANDB_API_KEY, MLFLOW_TRACKING_URI, ...: never in the spec
        pod["containers"][0]["envFrom"] = [{"secretRef": {"name": job.spec.tracking.credentials_secret}}]
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
            "suspend": job.spec.suspend or held,
            "template": _template(job, owner, "learner", pod, learner.pod_template),
        },
    }


def generator_probes() -> dict[str, Any]:
    """startupProbe, livenessProbe and readinessProbe of a generator container. The learner has
    none: its one liveness signal would be its step, and a checkpoint write of a large model
    (minutes to an hour on a network volume) looks the same as a hang, while killing it there
    costs every step since the last checkpoint; a learner that dies is restarted by its Job."""
    def probe(path: str, failures: int) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": "probes"}, "periodSeconds": PROBE_PERIOD_SECONDS,
                "timeoutSeconds": 5, "failureThreshold": failures}
    return {"startupProbe": probe("/livez", STARTUP_FAILURES), "livenessProbe": probe("/livez", LIVENESS_FAILURES),
            "readinessProbe": probe("/readyz", 2)}


def generator_replicas(job: api.AsyncRLHFJob, *, finished: bool = False, allowed: Optional[int] = None) -> int:
    """The default group's generators (generator.replicas less the searchers'), 0 when suspended
    or finished, at most `allowed` (what Kueue admitted)."""
    return group_replicas(job, finished=finished, allowed=allowed)[0]


def group_replicas(job: api.AsyncRLHFJob, *, finished: bool = False, allowed: Optional[int] = None) -> list[int]:
    """Generators per group (`GeneratorSpec.groups()`: the default group, then each searcher);
    Kueue's admitted count `allowed` is handed out in that order."""
    left = 0 if job.spec.suspend or finished else (job.spec.generator.replicas if allowed is None else allowed)
    counts = []
    for group in job.spec.generator.groups():
        counts.append(min(group.replicas, left))
        left -= counts[-1]
    return counts


def searcher_deployments(
    job: api.AsyncRLHFJob, owner: Owner, default_url: str, *, finished: bool = False,
    allowed: Optional[int] = None,
) -> list[dict[str, Any]]:
    """One Deployment `<job>-generator-<name>` per TBA searcher (`generator.searchers`): the
    generator pod with ASYNCRLHF_SEARCHER set (the generator reads its syncEvery from the spec) and
    the label SEARCHER_LABEL, which its selector adds to the generators' (the default group's
    Deployment keeps its selector; ReplicaSets own their pods, so the two never adopt each other's)."""
    out = []
    counts = group_replicas(job, finished=finished, allowed=allowed)
    for group, replicas in list(zip(job.spec.generator.groups(), counts))[1:]:
        d = generator_deployment(job, owner, default_url, finished=finished, allowed=allowed)
        d["metadata"]["name"] = f"{Names(owner.name).generator}-{group.name}"
        for where in (d["metadata"]["labels"], d["spec"]["selector"]["matchLabels"],
                      d["spec"]["template"]["metadata"]["labels"]):
            where[SEARCHER_LABEL] = group.name
        d["spec"]["replicas"] = replicas
        d["spec"]["template"]["spec"]["containers"][0]["env"].append(
            {"name": workload_env.SEARCHER, "value": group.name})
        out.append(d)
    return out


def generator_deployment(
    job: api.AsyncRLHFJob, owner: Owner, default_url: str, *, finished: bool = False,
    allowed: Optional[int] = None,
) -> dict[str, Any]:
    generator = job.spec.generator
    env = _env(job, default_url) + [
        {"name": workload_env.GENERATOR_ID, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ] + _reward_env(job)
    resources = _resources(generator.resources.cpu, generator.resources.memory, generator.resources.gpus)
    pod = _pod_spec(job, owner, role="generator", resources=resources, env=env,
                    gpus=generator.resources.gpus)
    container = pod["containers"][0]
    for mount in container["volumeMounts"]:  # generators only read snapshots (a damaged or hostile
        if mount["name"] == "snapshots":     # generator cannot touch what the learner wrote)
            mount["readOnly"] = True
    volumes, mounts = _reward_code(job)
    pod["volumes"] += volumes
    container["volumeMounts"] += mounts
    container.update(generator_probes())
    # metrics.port is the user's to choose: the probes never take the port it binds first
    port = workload_env.PROBES_PORT + (job.spec.metrics.port == workload_env.PROBES_PORT)
    container["ports"] = container.get("ports", []) + [{"name": "probes", "containerPort": port}]
    container["env"].append({"name": workload_env.PROBES_ADDRESS, "value": f"0.0.0.0:{port}"})
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": metadata(owner, Names(owner.name).generator, "generator"),
        "spec": {
            "replicas": generator_replicas(job, finished=finished, allowed=allowed),
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector(owner, "generator")},
            # Recreate: a new config never needs a spare GPU (a rolling update would surge one)
            "strategy": {"type": "Recreate"},
            "template": _template(job, owner, "generator", pod, generator.pod_template),
        },
    }
