"""The data plane: one JetStream stream and one KV bucket per job, and the embedded nats-server.

Names are derived here and nowhere else (the operator uses the same functions).

Stream `ARJ_<ns>_<job>`, subjects `asyncrlhf.<ns>.<job>.{prompts,rollouts,weights,preferences}`,
work-queue retention: a prompt or rollout leaves the stream when its consumer acks it, so the
stream holds only outstanding work and `max_bytes` with discard=new turns a slow learner into
back-pressure on publishers instead of lost data. Weight announcements have no consumer: readers
fetch the last one directly (a restarted generator finds it at once). Progress goes to the KV
bucket `arj_<ns>_<job>` (keys `learner`, `generator.<id>`, `reward-head`), read and written through kv.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import nats
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from . import identity, workload_env
from .bus_publish import PUBLISH_RETRYABLE, PUBLISHES_IN_FLIGHT, publish, publish_all  # noqa: F401 (re-exported)
from .natsserver import EmbeddedNats, free_port, nats_server_binary  # noqa: F401 (re-exported)
from .messages import MessageError, WeightsAnnouncement

PROMPTS, ROLLOUTS, WEIGHTS, PREFERENCES = "prompts", "rollouts", "weights", "preferences"
DEAD = "dead"  # messages no reader could use, with the reason in a header (a stream of their own)
DEAD_LETTERS_KEPT = 1000  # the newest are kept; older ones are discarded
REASON_HEADER = "Asyncrlhf-Reason"
GENERATORS_CONSUMER = "generators"
LEARNER_CONSUMER = "learner"
REWARD_CONSUMER = "reward"
DEDUP_WINDOW_SECONDS = 3600.0
log = logging.getLogger("asyncrlhf.bus")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class JobBus:
    """Names of one job's stream, subjects, consumers and KV bucket.

    Namespace and job are DNS labels (letters, digits, '-'; checked here), so '_' never occurs in
    either and joins them unambiguously: `team-a/x` is `ARJ_team-a_x`, `team/a-x` is `ARJ_team_a-x`
    (names that once both read `ARJ_team_a_x`). No '.', '*' or '>' can reach a subject either."""

    namespace: str
    job: str
    uid: str = field(default="", compare=False)  # the job's metadata.uid, recorded in what it creates (identity.py)

    def __post_init__(self) -> None:
        for what, value in (("namespace", self.namespace), ("job name", self.job)):
            if not isinstance(value, str) or not _DNS_LABEL.fullmatch(value):
                raise ValueError(f"{what} {value!r} is not a DNS label (lower-case letters, digits and '-', "
                                 "at most 63): it cannot name a job's stream and subjects")

    @property
    def prefix(self) -> str:
        return f"asyncrlhf.{self.namespace}.{self.job}"

    def subject(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    @property
    def stream(self) -> str:
        return f"ARJ_{self.namespace}_{self.job}"

    @property
    def inbox_prefix(self) -> str:
        """The job's reply subjects (nats-py's inbox_prefix): the only ones its NATS user may
        subscribe to in JWT mode, so no job reads another's replies or fetched messages."""
        return f"_INBOX.{self.namespace}.{self.job}"

    @property
    def bucket(self) -> str:
        return f"arj_{self.namespace}_{self.job}"

    @property
    def dead_stream(self) -> str:
        return f"{self.stream}_DEAD"

    def dead_stream_config(self) -> StreamConfig:
        """Limits retention, the newest DEAD_LETTERS_KEPT: dead letters never fill the job's stream."""
        return StreamConfig(name=self.dead_stream, subjects=[self.subject(DEAD)], retention=RetentionPolicy.LIMITS,
                            storage=StorageType.FILE, max_msgs=DEAD_LETTERS_KEPT, discard=DiscardPolicy.OLD)

    def stream_config(self, max_bytes: int) -> StreamConfig:
        return StreamConfig(
            name=self.stream,
            subjects=[self.subject(s) for s in (PROMPTS, ROLLOUTS, WEIGHTS, PREFERENCES)],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            max_bytes=max_bytes,
            discard=DiscardPolicy.NEW,
            duplicate_window=DEDUP_WINDOW_SECONDS,
            metadata=identity.stream_metadata(self.uid),
        )

    def consumer_configs(self, ack_wait: float) -> list[ConsumerConfig]:
        def durable(name: str, subject: str) -> ConsumerConfig:
            return ConsumerConfig(
                durable_name=name,
                filter_subject=self.subject(subject),
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=ack_wait,
                max_deliver=-1,
                max_ack_pending=100_000,
            )

        return [
            durable(GENERATORS_CONSUMER, PROMPTS),
            durable(LEARNER_CONSUMER, ROLLOUTS),
            durable(REWARD_CONSUMER, PREFERENCES),
        ]


def credentials_from_env() -> dict:
    """NATS connection options as the operator passes them (from Secrets; never logged): the
    credentials, the inbox prefix, TLS."""
    options: dict = {"tls": tls_context(os.environ.get(workload_env.NATS_TLS_CA, ""),
                                        os.environ.get(workload_env.NATS_TLS_CERT, ""),
                                        os.environ.get(workload_env.NATS_TLS_KEY, ""))}
    if os.environ.get(workload_env.NATS_INBOX_PREFIX):
        options["inbox_prefix"] = os.environ[workload_env.NATS_INBOX_PREFIX]
    creds = os.environ.get(workload_env.NATS_CREDS, "")
    user, password = os.environ.get(workload_env.NATS_USER), os.environ.get(workload_env.NATS_PASSWORD)
    if creds and os.path.isfile(creds):
        options["user_credentials"] = creds
    elif user and password:
        options.update(user=user, password=password)
    return {k: v for k, v in options.items() if v is not None}


def tls_context(ca: str = "", cert: str = "", key: str = "", *, ca_data: str = "") -> Optional[ssl.SSLContext]:
    """An SSL context that verifies the server with the CA bundle (a file `ca` that exists, or PEM
    `ca_data`), with a client certificate when `cert` and `key` are files (mutual TLS); None when no
    CA is given (plain TCP, or the system's CAs when the URL says tls://)."""
    if not ca_data and not (ca and os.path.isfile(ca)):
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca or None, cadata=ca_data or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert and key and os.path.isfile(cert) and os.path.isfile(key):
        context.load_cert_chain(cert, key)
    return context


async def _log_error(err: Exception) -> None:
    log.warning("NATS: %s", err or type(err).__name__)  # one line: reconnect attempts are expected


async def _log_disconnected() -> None:
    log.info("NATS: disconnected")  # also called on a clean close; outages show up as errors


async def _log_reconnected() -> None:
    log.info("NATS: reconnected")


async def connect(url: str, **options) -> nats.NATS:
    """Connect with reconnects on (a bus restart is survived, not fatal)."""
    options = {"error_cb": _log_error, "disconnected_cb": _log_disconnected,
               "reconnected_cb": _log_reconnected} | credentials_from_env() | options
    return await nats.connect(
        url, max_reconnect_attempts=-1, reconnect_time_wait=0.5, connect_timeout=5, **options
    )


class BusLimitError(ValueError):
    """The bus cannot carry this job's messages (a restart cannot help)."""


def check_message_size(nc, wanted: int) -> None:
    """The server takes messages of `wanted` bytes (spec.nats.maxMessageBytes), else BusLimitError."""
    if nc.max_payload < wanted:
        fix = (f"set nats.maxMessageBytes to at most {nc.max_payload}, or " if nc.max_payload >= 1 << 20 else
               "jobs need at least 1 MiB (NATS's default): ")
        raise BusLimitError(
            f"the bus takes messages of at most {nc.max_payload} bytes (its max_payload), but "
            f"spec.nats.maxMessageBytes is {wanted}: {fix}raise max_payload in the NATS server's configuration "
            f"(the chart: nats.maxPayload)")


async def close_quietly(nc) -> None:
    """Flush (acks are plain publishes: they must reach the server) and close; a bus that is
    already gone must not turn a clean exit into a failure (nats-py's close raises on the lost
    socket when something was published while reconnecting). Not drain(): with pull subscriptions
    it leaves a cancelled gather behind that asyncio logs as an error at exit."""
    try:
        await nc.flush(timeout=5)
    except (asyncio.TimeoutError, nats.errors.Error):
        pass
    try:
        await nc.close()
    except OSError as err:  # the socket of a bus that went away (nats-py drains it on close)
        log.info("NATS: closed with the connection already lost (%s)", err)


async def ensure_job_resources(js, bus: JobBus, max_bytes: int, ack_wait: float) -> None:
    """Create (or update) the job's stream, durable consumers and KV bucket. Idempotent. What
    another job of the same name left (another UID recorded, identity.py) is deleted first."""
    if any(identity.differs(bus.uid, uid) for uid in await identity.recorded_uids(js, bus.stream, bus.bucket)):
        log.warning("the stream and KV bucket of %s/%s belong to an earlier job of that name (not uid %s): "
                    "deleting them", bus.namespace, bus.job, bus.uid)
        await delete_job_resources(js, bus)
    config = bus.stream_config(max_bytes)
    try:
        await js.stream_info(bus.stream)
        await js.update_stream(config)
    except NotFoundError:
        await js.add_stream(config)
    existing = {c.name for c in await js.consumers_info(bus.stream)}
    for consumer in bus.consumer_configs(ack_wait):
        if consumer.durable_name not in existing:
            await js.add_consumer(bus.stream, consumer)
    await js.create_key_value(bucket=bus.bucket, history=1)
    await identity.record_uid(js, bus.bucket, bus.uid)
    try:
        await js.stream_info(bus.dead_stream)
    except NotFoundError:
        await js.add_stream(bus.dead_stream_config())


class StreamWatch:
    """Is the job's stream still the one this process set up? NATS storage lost (a wiped volume, a
    new server) leaves it gone or recreated empty: the prompts released into it are lost."""

    def __init__(self, bus: JobBus) -> None:
        self.bus = bus
        self.created = None

    async def remember(self, js) -> None:
        self.created = (await js.stream_info(self.bus.stream)).created

    async def lost(self, js) -> bool:
        """True when the stream is gone or not the one remembered; False too when the bus is away
        (nothing to conclude)."""
        try:
            created = (await js.stream_info(self.bus.stream)).created
        except NotFoundError:
            return True
        except (nats.errors.Error, asyncio.TimeoutError):
            return False
        return created != self.created


async def delete_job_resources(js, bus: JobBus) -> None:
    for delete in (lambda: js.delete_stream(bus.stream), lambda: js.delete_key_value(bus.bucket),
                   lambda: js.delete_stream(bus.dead_stream)):
        try:
            await delete()
        except NotFoundError:
            pass


async def latest_weights(js, bus: JobBus) -> Optional[WeightsAnnouncement]:
    """The newest weights announcement (None: none yet, or it cannot be read — logged; the next
    announcement replaces it)."""
    try:
        raw = await js.get_last_msg(bus.stream, bus.subject(WEIGHTS))
    except NotFoundError:
        return None
    try:
        return WeightsAnnouncement.decode(raw.data)
    except MessageError as err:
        log.error("ignoring an unreadable weights announcement: %s", err)
        return None


async def dead_letter(js, bus: JobBus, msg, reason: str) -> None:
    """Set aside a message no reader can use: a copy goes to the job's dead letters (reason in a
    header), the message itself is terminated (never redelivered). A copy that cannot be written
    is logged; the message is terminated all the same, so it cannot wedge its consumer."""
    try:
        await js.publish(bus.subject(DEAD), msg.data, timeout=5,
                         headers={REASON_HEADER: reason[:1000], "Asyncrlhf-Subject": msg.subject or ""})
    except (nats.errors.Error, asyncio.TimeoutError) as err:
        log.warning("could not keep a dead letter (%s): %s", reason, err)
    try:
        await msg.term()
    except (nats.errors.Error, asyncio.TimeoutError) as err:
        log.warning("could not terminate a dead letter (it will come back and be set aside again): %s", err)


@asynccontextmanager
async def keep_alive(messages: Callable[[], Iterable], ack_wait: float, limit: float = float("inf")):
    """While the block runs (a long training step, a long generation), tell the server every
    ack_wait/3 seconds that the messages are still being worked on, so they are not redelivered.
    After `limit` seconds it stops: a process that hangs (an engine stuck in a kernel) does not
    hold its messages for ever — they go to another consumer one ack wait later."""

    async def beat() -> None:
        deadline = time.monotonic() + limit
        while True:
            await asyncio.sleep(ack_wait / 3)
            if time.monotonic() > deadline:
                log.warning("held messages for %.0f s: no longer extending their ack deadlines", limit)
                return
            for msg in list(messages()):
                try:
                    await msg.in_progress()
                except nats.errors.Error as err:  # a bus outage: redelivery is safe, just slower
                    log.warning("could not extend a message's ack deadline: %s", err)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
