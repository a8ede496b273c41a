"""The operator's side of the bus: the job's stream and KV bucket, and reading progress.

Names and configurations come from `asyncrlhf.bus` (shared with the workloads). One NATS
connection per (URL, credentials) is kept and reused across jobs and timer ticks; a closed
one (the server went away for longer than the reconnect attempts) is replaced on next use.

Credentials stay in memory: a Secret's `.creds` is handed to nats-py as RawCredentials (it signs
the server's nonce with the seed on every (re)connect; `nkeys` does the signing), never written
to a file. The operator's own credentials are used only for jobs that name no bus of their own
(validation.foreign_bus_error refuses the others).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import os
import ssl
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Mapping, Optional

import kopf
import nats
from nats.aio.client import RawCredentials
from nats.js.errors import BucketNotFoundError, NotFoundError

from asyncrlhf import api, workload_env
from asyncrlhf.bus import JobBus, delete_job_resources, ensure_job_resources, tls_context
from asyncrlhf.kv import LEARNER_KEY, JobKV
from asyncrlhf.messages import GeneratorStatus, LearnerProgress

from . import natsauth, plan
from .kube import Kube
from .plan import natsaccess

log = logging.getLogger(__name__)
CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Credentials:
    """How to reach a bus: a .creds file, or user and password; TLS: the CA (PEM) that verifies the
    server, a client certificate and key (PEM) for mutual TLS."""

    creds: str = field(default="", repr=False)  # never in a log line or a traceback
    user: str = ""
    password: str = field(default="", repr=False)
    ca: str = field(default="", repr=False)
    cert: str = field(default="", repr=False)
    key: str = field(default="", repr=False)

    def tls(self) -> Optional[ssl.SSLContext]:
        """The SSL context (None: no CA given). A client key is loaded from memory (memfd), never a file."""
        context = tls_context(ca_data=self.ca)
        if context is not None and self.cert and self.key:
            with _memory_file(self.cert) as cert, _memory_file(self.key) as key:
                context.load_cert_chain(cert, key)
        return context


@contextmanager
def _memory_file(text: str):
    fd = os.memfd_create("asyncrlhf-nats-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, text.encode())
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _read(path: str) -> str:
    if not path or not os.path.isfile(path):
        return ""
    with open(path) as f:
        return f.read()


@lru_cache(maxsize=4)
def _minted_operator_creds(authority: natsauth.Authority) -> str:
    return authority.operator_creds()  # one user per process: minted once, kept in memory


def operator_credentials(env: Mapping[str, str] = os.environ) -> Credentials:
    """The operator's own NATS credentials for its bus (the chart's NATS): in JWT mode a user it
    mints itself with the account signing key; else user and password (from the chart's Secret);
    TLS from the files the chart mounts."""
    tls = {"ca": _read(env.get(workload_env.NATS_TLS_CA, "")), "cert": _read(env.get(workload_env.NATS_TLS_CERT, "")),
           "key": _read(env.get(workload_env.NATS_TLS_KEY, ""))}
    authority = natsauth.authority_from_env(env)
    if authority is not None:
        return Credentials(creds=_minted_operator_creds(authority), **tls)
    return Credentials(user=env.get(workload_env.NATS_USER, ""), password=env.get(workload_env.NATS_PASSWORD, ""),
                       **tls)


async def _secret_data(kube: Kube, namespace: str, secret: str, field_name: str) -> dict[str, str]:
    obj = await kube.get("v1", "Secret", namespace, secret)
    if obj is None:
        raise kopf.TemporaryError(f"spec.nats.{field_name}: Secret {namespace}/{secret} not found", delay=30)
    return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}


async def read_credentials(kube: Kube, namespace: str, nats_spec: api.NatsSpec) -> Credentials:
    """The credentials (and TLS) the operator uses on a job's bus: the job's Secrets when it names
    them, else the operator's own (only ever for the operator's own bus: validation refuses a job
    that names a bus and no credentials)."""
    own = operator_credentials()
    creds = own
    if nats_spec.credentials_secret:
        data = await _secret_data(kube, namespace, nats_spec.credentials_secret, "credentialsSecret")
        creds = Credentials(creds=data.get("creds", ""), user=data.get("user", ""), password=data.get("password", ""),
                            ca=own.ca if not nats_spec.url else "")
    if nats_spec.tls_secret:
        data = await _secret_data(kube, namespace, nats_spec.tls_secret, "tlsSecret")
        creds = dataclasses.replace(creds, ca=data.get("ca.crt", ""), cert=data.get("tls.crt", ""),
                                    key=data.get("tls.key", ""))
    return creds


class Buses:
    """Pooled NATS connections and the per-job operations on them."""

    def __init__(self) -> None:
        self._connections: dict[tuple[str, Credentials], Any] = {}
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        for nc in self._connections.values():
            if not nc.is_closed:
                await nc.close()
        self._connections.clear()

    async def jetstream(self, url: str, credentials: Credentials = Credentials()):
        async with self._lock:
            key = (url, credentials)
            nc = self._connections.get(key)
            if nc is None or nc.is_closed:
                nc = await self._connect(url, credentials)
                self._connections[key] = nc
            return nc.jetstream()

    async def _connect(self, url: str, credentials: Credentials):
        options: dict[str, Any] = {}
        if credentials.creds:
            options["user_credentials"] = RawCredentials(credentials.creds)
        elif credentials.user:
            options.update(user=credentials.user, password=credentials.password)
        tls = credentials.tls()
        if tls is not None:
            options["tls"] = tls

        async def quiet(err: Exception) -> None:
            log.debug("NATS %s: %s", url, err)

        try:
            return await asyncio.wait_for(nats.connect(
                url, connect_timeout=3, max_reconnect_attempts=3, reconnect_time_wait=1,
                error_cb=quiet, **options), CONNECT_TIMEOUT)
        except (asyncio.TimeoutError, OSError, nats.errors.Error) as err:
            raise kopf.TemporaryError(f"NATS at {url} is not reachable: {err}", delay=10) from err

    async def ensure(self, job: api.AsyncRLHFJob, url: str, credentials: Credentials) -> None:
        js = await self.jetstream(url, credentials)
        await ensure_job_resources(js, job_bus(job), job.spec.nats.max_bytes, job.spec.nats.ack_wait_seconds)

    async def delete(self, bus: JobBus, url: str, credentials: Credentials) -> None:
        js = await self.jetstream(url, credentials)
        await delete_job_resources(js, bus)

    async def progress(
        self, bus: JobBus, url: str, credentials: Credentials
    ) -> tuple[Optional[LearnerProgress], tuple[GeneratorStatus, ...]]:
        """The learner's and the generators' latest reports (none yet: None and ())."""
        js = await self.jetstream(url, credentials)
        try:
            kv = await JobKV.open(js, bus.bucket)
        except (BucketNotFoundError, NotFoundError):
            return None, ()
        learner = await kv.get(LEARNER_KEY, LearnerProgress)
        return learner, tuple((await kv.reports()).values())


def job_bus(job: api.AsyncRLHFJob) -> JobBus:
    """The job's bus names; its UID is recorded in the stream and bucket it creates (identity.py)."""
    return JobBus(job.metadata.namespace, job.metadata.name, uid=(job.metadata.model_extra or {}).get("uid", ""))


def job_secret(job: api.AsyncRLHFJob, owner: plan.Owner, data: Mapping[str, str]) -> dict[str, Any]:
    """The operator's Secret `<job>-nats` (owned by the job: deleted with it)."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": plan.metadata(owner, natsaccess.job_secret_name(job), "nats-credentials"),
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in sorted(data.items())}}


async def ensure_job_secret(kube: Kube, job: api.AsyncRLHFJob, owner: plan.Owner) -> None:
    """For a job on the operator's bus: in JWT mode its own NATS user (kept while it is still valid
    for this job, else minted again), and the operator's CA. Nothing to give: no Secret."""
    if not natsaccess.uses_operator_bus(job):
        return
    authority, own = natsauth.authority_from_env(), operator_credentials()
    data: dict[str, str] = {}
    if own.ca and not job.spec.nats.tls_secret:
        data[natsaccess.CA_KEY] = own.ca
    if authority is not None and not job.spec.nats.credentials_secret:
        existing = await kube.get("v1", "Secret", owner.namespace, natsaccess.job_secret_name(job))
        old = base64.b64decode(((existing or {}).get("data") or {}).get(natsaccess.CREDS_KEY, "")).decode()
        bus = job_bus(job)
        data[natsaccess.CREDS_KEY] = old if authority.still_valid(old, bus) else authority.job_creds(bus)
    if data:
        await kube.apply(job_secret(job, owner, data))
