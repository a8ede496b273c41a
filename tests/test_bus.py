"""The bus against a real nats-server: resources, de-duplication, back-pressure, ack deadlines.

No test sleeps and then asserts: each waits for an observable state (a redelivery counter, a
refused publish, the stream's message count) with `eventually`, whose deadline only bounds how
long a broken build may hang; it is never a threshold that a slow machine could trip.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import nats
import pytest

from asyncrlhf.bus import (
    GENERATORS_CONSUMER, LEARNER_CONSUMER, PROMPTS, ROLLOUTS, EmbeddedNats, JobBus, close_quietly, connect,
    delete_job_resources, ensure_job_resources, keep_alive, publish, publish_all,
)

DEADLINE = 60.0  # seconds; reaching it is a failure, so it is generous on purpose


@pytest.fixture(scope="module")
def server():
    with EmbeddedNats() as srv:
        yield srv


async def _setup(server, job: str, ack_wait: float = 30.0, max_bytes: int = 1 << 20):
    nc = await connect(server.url)
    js = nc.jetstream()
    bus = JobBus("test", job)
    await ensure_job_resources(js, bus, max_bytes, ack_wait)
    return nc, js, bus


async def _fetch(sub, n=10, timeout=0.5) -> list:
    try:
        return await sub.fetch(n, timeout=timeout)
    except (nats.errors.TimeoutError, asyncio.TimeoutError):
        return []


async def eventually(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll the async `condition` until it holds; fail naming `what` after DEADLINE seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not await condition():
        if loop.time() > deadline:
            raise AssertionError(f"{what}: still not the case after {DEADLINE:.0f} s")
        await asyncio.sleep(0.05)


async def _messages_in_stream(js, bus) -> int:
    return (await js.stream_info(bus.stream)).state.messages


class _RefusalCounter:
    """A JetStream context that counts the publishes the server refused (full stream, ...)."""

    def __init__(self, js) -> None:
        self._js, self.refused = js, 0

    async def publish(self, *args, **kwargs):
        try:
            return await self._js.publish(*args, **kwargs)
        except nats.errors.Error:
            self.refused += 1
            raise

    def __getattr__(self, name: str):
        return getattr(self._js, name)


def test_resources_are_idempotent_and_deleted(server):
    async def go():
        nc, js, bus = await _setup(server, "idem")
        await ensure_job_resources(js, bus, 1 << 20, 30.0)  # a second time changes nothing
        names = sorted(c.name for c in await js.consumers_info(bus.stream))
        assert names == ["generators", "learner", "reward"]
        await delete_job_resources(js, bus)
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.stream_info(bus.stream)
        await delete_job_resources(js, bus)  # already gone: fine
        await nc.close()
    asyncio.run(go())


def test_duplicate_publishes_are_dropped_and_acked_messages_leave(server):
    async def go():
        nc, js, bus = await _setup(server, "dedup")
        for _ in range(3):
            await publish(js, bus.subject(PROMPTS), b"{}", msg_id="p0-0")
        assert await _messages_in_stream(js, bus) == 1
        msgs = await _fetch(await js.pull_subscribe_bind(GENERATORS_CONSUMER, bus.stream))
        assert len(msgs) == 1
        await msgs[0].ack_sync()

        async def gone() -> bool:  # work queue: a message leaves once acked
            return await _messages_in_stream(js, bus) == 0
        await eventually(gone, "the acked prompt leaves the stream")
        await nc.close()
    asyncio.run(go())


def test_keep_alive_prevents_redelivery_during_long_work(server):
    async def go():
        nc, js, bus = await _setup(server, "alive", ack_wait=1.0)
        await publish(js, bus.subject(ROLLOUTS), b"a", msg_id="a")
        await publish(js, bus.subject(ROLLOUTS), b"b", msg_id="b")
        sub = await js.pull_subscribe_bind(LEARNER_CONSUMER, bus.stream)
        first = await _fetch(sub, n=2)
        assert sorted(m.data for m in first) == [b"a", b"b"]
        # Both were delivered together; only "a" is kept alive. "b", never acked, is the witness
        # of the server's clock: each redelivery of it proves one more ack deadline has passed.
        held = [m for m in first if m.data == b"a"]
        seen: list = []

        async def witness_past_three_deadlines() -> bool:
            seen.extend(await _fetch(sub))
            return any(m.data == b"b" and m.metadata.num_delivered >= 4 for m in seen)
        async with keep_alive(lambda: held, ack_wait=1.0):
            await eventually(witness_past_three_deadlines, "the unacked witness is redelivered 3 times")
        assert {m.data for m in seen} == {b"b"}, "'a' was redelivered while kept alive"

        # without keep-alive, the unacked "a" does come back, like "b"
        again: list = []

        async def both_back() -> bool:
            again.extend(await _fetch(sub))
            return {m.data for m in again} == {b"a", b"b"}
        await eventually(both_back, "'a' is redelivered once no longer kept alive")
        assert [m.metadata.num_delivered for m in again if m.data == b"a"][0] == 2
        await nc.close()
    asyncio.run(go())


def test_a_full_stream_applies_back_pressure_instead_of_dropping(server):
    async def go():
        nc, js, bus = await _setup(server, "full", max_bytes=1 << 20)
        payload = b"x" * (200 << 10)
        published = 0
        with pytest.raises(nats.js.errors.APIError):
            for i in range(10):
                await publish(js, bus.subject(ROLLOUTS), payload, msg_id=f"m{i}", attempts=2)
                published += 1
        assert 3 <= published < 10
        # a publisher with the default patience waits: refused, it retries instead of giving up
        counter = _RefusalCounter(js)
        waiting = asyncio.create_task(publish(counter, bus.subject(ROLLOUTS), payload, msg_id="late"))

        async def refused_and_retrying() -> bool:
            return counter.refused >= 3
        await eventually(refused_and_retrying, "the publisher to a full stream is refused and retries")
        assert not waiting.done()
        assert await _messages_in_stream(js, bus) == published  # nothing dropped, nothing added
        # the learner consumes: room again, and the publisher that was waiting gets through
        consumed = await _fetch(await js.pull_subscribe_bind(LEARNER_CONSUMER, bus.stream), n=2)
        assert len(consumed) == 2
        for m in consumed:
            await m.ack_sync()
        await asyncio.wait_for(waiting, DEADLINE)
        assert await _messages_in_stream(js, bus) == published - 2 + 1
        await nc.close()
    asyncio.run(go())


class _InFlightCounter:
    """A JetStream context that records how many publishes await their PubAck at once."""

    def __init__(self, js, fail_id: str = "") -> None:
        self._js, self.fail_id, self.now, self.most = js, fail_id, 0, 0

    async def publish(self, *args, headers=None, **kwargs):
        if headers and headers.get("Nats-Msg-Id") == self.fail_id:
            raise ValueError("not a bus error: no retry")
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            return await self._js.publish(*args, headers=headers, **kwargs)
        finally:
            self.now -= 1


def test_publish_all_keeps_a_bounded_number_in_flight_and_reports_each_stored_message(server):
    async def go():
        nc, js, bus = await _setup(server, "many")
        counter, done = _InFlightCounter(js), []

        async def then(i: int) -> None:
            done.append(i)
        ids = [f"m{i % 90}" for i in range(100)]  # the last 10 repeat earlier ids
        await publish_all(counter, [(bus.subject(ROLLOUTS), b"x", m) for m in ids], then=then, in_flight=8)
        assert counter.most == 8  # all 8 slots used, never more
        assert sorted(done) == list(range(100))
        assert await _messages_in_stream(js, bus) == 90  # de-duplicated by id
        # a publish that fails for good fails the call (and the others are cancelled)
        with pytest.raises(ValueError):
            await publish_all(_InFlightCounter(js, fail_id="bad"), [(bus.subject(ROLLOUTS), b"y", m)
                                                                   for m in ("a", "bad", "c")])
        await nc.close()
    asyncio.run(go())


@pytest.mark.parametrize("as_path", [False, True])
async def test_embedded_nats_takes_a_config_and_extra_arguments(tmp_path, as_path):
    """The config file's settings and the extra arguments reach the server; JetStream, the store
    and the port still come from the command line; a given store is left in place."""
    config = "max_payload: 123456\n"
    if as_path:
        config = tmp_path / "mine.conf"
        config.write_text("max_payload: 123456\n")
    store = tmp_path / "store"
    with EmbeddedNats(store, config=config, extra_args=["--user", "u", "--pass", "p"]) as srv:
        with pytest.raises(nats.errors.Error, match="[Aa]uthorization"):
            await nats.connect(srv.url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=3)
        nc = await nats.connect(srv.url, user="u", password="p", allow_reconnect=False)
        try:
            assert nc.max_payload == 123456
            await ensure_job_resources(nc.jetstream(), JobBus("test", "opts"), 1 << 20, 30.0)
        finally:
            await nc.close()
    assert (store / "jetstream").is_dir() and (store / "nats-server.log").exists()
    assert (store / "nats.conf").exists() != as_path


async def test_close_quietly_with_the_bus_gone_does_not_raise():
    """A client that published while reconnecting to a server that is gone closes without an
    error (nats-py's close raises ConnectionResetError then): a workload stopping exits cleanly."""
    srv = EmbeddedNats().start()
    nc = await connect(srv.url)
    srv.close()
    await eventually(lambda: asyncio.sleep(0, not nc.is_connected), "the client to notice the server is gone")
    await nc.publish("x.y", b"z")  # e.g. a last report, buffered for a reconnect that never comes
    await close_quietly(nc)
    assert nc.is_closed
