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
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import kopf
import nats
from nats.aio.client import RawCredentials
from nats.js.errors import BucketNotFoundError, NotFoundError

from asyncrlhf import api, workload_env
from asyncrlhf.bus import JobBus, delete_job_resources, ensure_job_resources
from asyncrlhf.kv import LEARNER_KEY, JobKV
from asyncrlhf.messages import GeneratorStatus, LearnerProgress

from .kube import Kube

log = logging.getLogger(__name__)
CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Credentials:
    """What the job's credentials Secret holds: a .creds file, or user and password."""

    creds: str = field(default="", repr=False)  # never in a log line or a traceback
    user: str = ""
    password: str = field(default="", repr=False)


def operator_credentials() -> Credentials:
    """The operator's own NATS credentials (the chart's NATS, from its Secret via env)."""
    return Credentials(user=os.environ.get(workload_env.NATS_USER, ""),
                       password=os.environ.get(workload_env.NATS_PASSWORD, ""))


async def read_credentials(kube: Kube, namespace: str, secret: str) -> Credentials:
    if not secret:
        return operator_credentials()
    obj = await kube.get("v1", "Secret", namespace, secret)
    if obj is None:
        raise kopf.TemporaryError(f"spec.nats.credentialsSecret: Secret {namespace}/{secret} not found",
                                  delay=30)
    data = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
    return Credentials(creds=data.get("creds", ""), user=data.get("user", ""),
                       password=data.get("password", ""))


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
    return JobBus(job.metadata.namespace, job.metadata.name)
