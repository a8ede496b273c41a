"""How a job's pods reach its bus: credentials, TLS and the inbox prefix (env and volumes).

Three Secrets can be involved, each mounted where the workloads find it through
`asyncrlhf.workload_env` (a file that is not there is simply not used, `bus.credentials_from_env`):

- spec.nats.credentialsSecret (the job's own): `creds` at NATS_CREDS_DIR, or `user`/`password`
  as env by secretKeyRef.
- `<job>-nats`, the operator's (jobs on the operator's bus only, optional): in JWT mode `creds`,
  a user the operator minted for this job alone (`natsauth.job_permissions`); with an operator
  CA, `ca.crt`. Mounted whether or not the operator made one, so the pod spec does not depend on
  the operator's settings; the operator writes it before the pods (children.apply_all).
- spec.nats.tlsSecret: `ca.crt` (and `tls.crt`/`tls.key`, mutual TLS) at NATS_TLS_DIR.

The inbox prefix (`JobBus.inbox_prefix`) is always set: in JWT mode it is the only subject
prefix the job's user may subscribe to.
"""

from __future__ import annotations

from typing import Any

from asyncrlhf import api, workload_env
from asyncrlhf.bus import JobBus

from .meta import Names

NATS_CREDS_DIR = "/var/run/asyncrlhf/nats"
NATS_JOB_DIR = "/var/run/asyncrlhf/nats-job"
NATS_TLS_DIR = "/var/run/asyncrlhf/nats-tls"
CREDS_KEY, CA_KEY, CERT_KEY, KEY_KEY = "creds", "ca.crt", "tls.crt", "tls.key"


def job_secret_name(job: api.AsyncRLHFJob) -> str:
    """The operator's per-job Secret (its creds in JWT mode, the operator's CA)."""
    return Names(job.metadata.name).nats


def uses_operator_bus(job: api.AsyncRLHFJob) -> bool:
    return not job.spec.nats.url


def nats_env(job: api.AsyncRLHFJob) -> list[dict[str, Any]]:
    nats = job.spec.nats
    env: list[dict[str, Any]] = [{"name": workload_env.NATS_INBOX_PREFIX,
                                  "value": JobBus(job.metadata.namespace, job.metadata.name).inbox_prefix}]
    if nats.credentials_secret:
        for var, key in ((workload_env.NATS_USER, "user"), (workload_env.NATS_PASSWORD, "password")):
            env.append({"name": var, "valueFrom": {
                "secretKeyRef": {"name": nats.credentials_secret, "key": key, "optional": True}}})
        env.append({"name": workload_env.NATS_CREDS, "value": f"{NATS_CREDS_DIR}/{CREDS_KEY}"})
    elif uses_operator_bus(job):
        env.append({"name": workload_env.NATS_CREDS, "value": f"{NATS_JOB_DIR}/{CREDS_KEY}"})
    if nats.tls_secret:
        env += [{"name": workload_env.NATS_TLS_CA, "value": f"{NATS_TLS_DIR}/{CA_KEY}"},
                {"name": workload_env.NATS_TLS_CERT, "value": f"{NATS_TLS_DIR}/{CERT_KEY}"},
                {"name": workload_env.NATS_TLS_KEY, "value": f"{NATS_TLS_DIR}/{KEY_KEY}"}]
    elif uses_operator_bus(job):
        env.append({"name": workload_env.NATS_TLS_CA, "value": f"{NATS_JOB_DIR}/{CA_KEY}"})
    return env


def nats_volumes(job: api.AsyncRLHFJob) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts): read-only Secret volumes (optional: a file that is not there is not used)."""
    nats = job.spec.nats
    sources = []
    if nats.credentials_secret:
        sources.append(("nats-credentials", nats.credentials_secret, NATS_CREDS_DIR, [CREDS_KEY]))
    if uses_operator_bus(job):
        sources.append(("nats-job", job_secret_name(job), NATS_JOB_DIR, None))
    if nats.tls_secret:
        sources.append(("nats-tls", nats.tls_secret, NATS_TLS_DIR, None))
    volumes, mounts = [], []
    for name, secret, path, keys in sources:
        source: dict[str, Any] = {"secretName": secret, "optional": True}
        if keys:
            source["items"] = [{"key": key, "path": key} for key in keys]
        volumes.append({"name": name, "secret": source})
        mounts.append({"name": name, "mountPath": path, "readOnly": True})
    return volumes, mounts
