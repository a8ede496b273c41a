"""Desired children of one AsyncRLHFJob: pure functions from the validated spec to manifests.

Nothing here talks to the API server; `kube.py` applies what these functions return, so the
whole shape of what the operator creates is testable with tables and the official schemas.
Callers use this package (`from asyncrlhf_operator import plan; plan.desired_children(...)`);
the modules below are its parts, and none imports another part's caller:

  meta.py     Owner, Names, labels, selectors, owner references
  runtime.py  spec fields the operator applies at run time; which children a change touches
  config.py   the rendered config (ConfigMap) and its hash
  volumes.py  the snapshot PVC, the model cache PVC and CSI VolumeSnapshots
  merge.py    strategic merge of a job's podTemplate over the operator's pod
  network.py  ServiceAccount, headless learner Service, NetworkPolicy, the job's NATS URL
  pods.py     the learner Job and the generator Deployment (pod spec, env, volumes)
  natsaccess.py  how the pods reach the bus: NATS credentials, TLS, inbox prefix (env, volumes)
  kueue.py    the job's Kueue Workload (gang admission) and what its admission lets run

Children (all labelled app.kubernetes.io/{name,instance,component,managed-by}, all owned by
the job except a retained snapshot volume, which must outlive it):

- ServiceAccount `<job>-workload`: no API token mounted; the workloads never call the API.
- Secret `<job>-nats` (not planned here: made by `jetstream.ensure_job_secret` before the pods,
  only on the operator's bus in JWT mode or with an operator CA): the job's own NATS user, the
  CA. The pods mount it optionally (`natsaccess.py`).
- ConfigMap `<job>-config`: the rendered spec at /etc/asyncrlhf/job.yaml. Fields the operator
  acts on at run time (generator.replicas, suspend, ttlSecondsAfterFinished,
  weightSync.volumeSnapshots) are left out, so scaling or suspending does not change the config
  and restarts nothing.
- PVC `<job>-snapshots` (unless spec.weightSync.volumeClaim): snapshots and checkpoints.
- PVC `<job>-model-cache` (when spec.model.cache.size names no existing claim): the HF cache.
- Service `<job>-learner` (headless): stable DNS names for multi-node rendezvous.
- NetworkPolicy `<job>-workload`: egress to NATS and DNS (and HTTPS when a hub model is
  named), traffic among learner pods; no other ingress.
- Job `<job>-learner` (Indexed): one pod per learner node. backoffLimit 0 with a
  podFailurePolicy that ignores disruptions: any real failure fails the whole Job, and the
  operator recreates it (all ranks at once, resuming from the checkpoint) up to
  spec.learner.backoffLimit times. Gang restarts are what distributed training needs, and
  one counter (status.restarts) is easier to reason about than two.
- Deployment `<job>-generator`: stateless generators, scaled freely; Recreate, so a new config
  never needs a spare GPU.
- Deployment `<job>-generator-<name>` per TBA searcher (`generator.searchers`): the same pod in
  the searcher's group (ASYNCRLHF_SEARCHER, label SEARCHER_LABEL); its replicas are carved out of
  generator.replicas, the default Deployment runs the rest.
- Workload `asyncrlhfjob-<job>` (kueue.x-k8s.io, only for a job labelled
  kueue.x-k8s.io/queue-name): learner and generators as one gang; until Kueue admits it the
  learner Job is suspended and the generators are at zero (kueue.py). Made by the status pass,
  not listed here: its lifecycle (replace, release after an eviction) follows Kueue's.
"""

from __future__ import annotations

from typing import Any

from asyncrlhf import api

from .config import CONFIG_DIR, CONFIG_HASH, CONFIG_KEY, CONFIG_PATH, config_hash, config_map, rendered_config
from .meta import MANAGER, Names, Owner, labels, metadata, owner_reference, selector
from .network import (
    DEFAULT_NATS_PORT, RENDEZVOUS_PORT, learner_service, nats_ports, nats_url, needs_hub, network_policy,
    service_account,
)
from .pods import (
    COMPLETION_INDEX, GPU, HF_TOKEN, NATS_CREDS_DIR, RUN_AS, SEARCHER_LABEL, SNAPSHOT_DIR, generator_deployment,
    generator_replicas, group_replicas, learner_job, searcher_deployments,
)
from .runtime import REPLICAS, RUNTIME_FIELDS, SUSPEND, TTL, VOLUME_SNAPSHOTS, changed_paths, kinds_for
from .merge import strategic_merge
from .kueue import (
    KUEUE_API, OPEN, QUEUE_LABEL, WORKLOAD, Gate, gate, queue_name, queued_workload, release_patch, workload_action,
    workload_name,
)
from .volumes import (
    claim_names, model_cache_claim_name, model_cache_pvc, snapshot_claim_name, snapshot_pvc, volume_snapshot,
    volume_snapshot_plan,
)

__all__ = [
    "CONFIG_DIR", "CONFIG_HASH", "CONFIG_KEY", "CONFIG_PATH", "config_hash", "config_map", "rendered_config",
    "MANAGER", "Names", "Owner", "labels", "metadata", "owner_reference", "selector",
    "DEFAULT_NATS_PORT", "RENDEZVOUS_PORT", "learner_service", "nats_ports", "nats_url", "needs_hub",
    "network_policy", "service_account",
    "COMPLETION_INDEX", "GPU", "HF_TOKEN", "NATS_CREDS_DIR", "RUN_AS", "SNAPSHOT_DIR", "generator_deployment",
    "generator_replicas", "learner_job", "SEARCHER_LABEL", "group_replicas", "searcher_deployments",
    "REPLICAS", "RUNTIME_FIELDS", "SUSPEND", "TTL", "VOLUME_SNAPSHOTS", "changed_paths", "kinds_for",
    "snapshot_claim_name", "snapshot_pvc", "volume_snapshot", "volume_snapshot_plan",
    "claim_names", "model_cache_claim_name", "model_cache_pvc", "strategic_merge",
    "KUEUE_API", "OPEN", "QUEUE_LABEL", "WORKLOAD", "Gate", "gate", "queue_name", "queued_workload",
    "release_patch", "workload_action", "workload_name",
    "desired_children",
]


def desired_children(
    job: api.AsyncRLHFJob, owner: Owner, default_url: str, *, finished: bool = False, admission: Gate = OPEN
) -> list[dict[str, Any]]:
    """Every child, in creation order (what pods mount exists before the pods); the workloads
    held (learner suspended, no generators) while Kueue has not admitted the job."""
    allowed = admission.generators if admission.admitted else 0
    children = [service_account(owner), config_map(job, owner), snapshot_pvc(job, owner),
                model_cache_pvc(job, owner),
                learner_service(owner), network_policy(job, owner, default_url),
                learner_job(job, owner, default_url, held=not admission.admitted),
                generator_deployment(job, owner, default_url, finished=finished, allowed=allowed),
                *searcher_deployments(job, owner, default_url, finished=finished, allowed=allowed)]
    return [child for child in children if child is not None]
