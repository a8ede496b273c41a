"""The bus against a real nats-server: resources, de-duplication, back-pressure, ack deadlines."""

from __future__ import annotations

import asyncio

import nats
import pytest

from asyncrlhf.bus import (
    GENERATORS_CONSUMER, LEARNER_CONSUMER, PROMPTS, ROLLOUTS, EmbeddedNats, JobBus, connect, delete_job_resources,
    ensure_job_resources, keep_alive, publish,
)


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


async def _fetch(js, bus, durable, n=10, timeout=0.5):
    sub = await js.pull_subscribe_bind(durable, bus.stream)
    try:
        return await sub.fetch(n, timeout=timeout)
    except (nats.errors.TimeoutError, asyncio.TimeoutError):
        return []


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
        msgs = await _fetch(js, bus, GENERATORS_CONSUMER)
        assert len(msgs) == 1
        await msgs[0].ack_sync()
        assert (await js.stream_info(bus.stream)).state.messages == 0  # work queue: gone once acked
        await nc.close()
    asyncio.run(go())


def test_keep_alive_prevents_redelivery_during_long_work(server):
    async def go():
        nc, js, bus = await _setup(server, "alive", ack_wait=1.0)
        await publish(js, bus.subject(ROLLOUTS), b"a", msg_id="a")
        await publish(js, bus.subject(ROLLOUTS), b"b", msg_id="b")
        held = await _fetch(js, bus, LEARNER_CONSUMER, n=1)  # "a": worked on for 3 ack deadlines
        async with keep_alive(lambda: held, ack_wait=1.0):
            await asyncio.sleep(3.0)
            other = await _fetch(js, bus, LEARNER_CONSUMER, n=10)
        # only "b" was available to another fetch: "a" was not redelivered while kept alive
        assert [m.data for m in other] == [b"b"]
        # without keep-alive, the unacked messages do come back (after about 1 s; allow for load)
        again: list = []
        for _ in range(10):
            again += await _fetch(js, bus, LEARNER_CONSUMER, n=10)
            if len(again) >= 2:
                break
        assert sorted(m.data for m in again) == [b"a", b"b"]
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
        # the learner consumes: room again, and the publisher that was waiting gets through
        waiting = asyncio.create_task(publish(js, bus.subject(ROLLOUTS), payload, msg_id="late"))
        await asyncio.sleep(0.5)
        assert not waiting.done()
        for m in await _fetch(js, bus, LEARNER_CONSUMER, n=2):
            await m.ack_sync()
        await asyncio.wait_for(waiting, 10)
        info = await js.stream_info(bus.stream)
        assert info.state.messages == published - 2 + 1
        await nc.close()
    asyncio.run(go())
