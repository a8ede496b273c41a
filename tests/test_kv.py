"""The typed KV layer against a real nats-server: keys, typed values, bad entries, retries."""

from __future__ import annotations

import asyncio

import pytest

from asyncrlhf.bus import EmbeddedNats, JobBus, connect, ensure_job_resources
from asyncrlhf.kv import HEAD_KEY, LEARNER_KEY, JobKV, generator_key
from asyncrlhf.messages import GeneratorStatus, LearnerProgress, RewardHead


@pytest.fixture(scope="module")
def server():
    with EmbeddedNats() as s:
        yield s


async def open_kv(url: str, job: str) -> tuple[object, JobKV]:
    nc = await connect(url)
    js = nc.jetstream()
    bus = JobBus("default", job)
    await ensure_job_resources(js, bus, 1 << 24, 30)
    return nc, await JobKV.open(js, bus.bucket)


def test_typed_values_round_trip_and_missing_keys_read_as_none(server):
    async def go():
        nc, kv = await open_kv(server.url, "typed")
        try:
            assert await kv.progress() is None and await kv.head() is None and await kv.reports() == {}
            await kv.put_progress(LearnerProgress(step=3, total_steps=10, policy_version=3, done=True))
            await kv.put_report(GeneratorStatus(generator_id="g0", policy_version=2, rollouts=5))
            await kv.put_head(RewardHead(theta=[0.5, -1.0], updates=7))
            assert (await kv.progress()).step == 3 and await kv.learner_finished()
            assert {k: r.rollouts for k, r in (await kv.reports()).items()} == {generator_key("g0"): 5}
            assert (await kv.head()).theta == [0.5, -1.0]
            assert sorted(await kv.kv.keys()) == sorted([LEARNER_KEY, HEAD_KEY, "generator.g0"])
        finally:
            await nc.close()

    asyncio.run(go())


def test_an_unreadable_entry_is_skipped_not_fatal(server):
    async def go():
        nc, kv = await open_kv(server.url, "bad")
        try:
            await kv.kv.put(LEARNER_KEY, b"not json")
            await kv.kv.put("generator.broken", b'{"v": 1}')
            await kv.put_report(GeneratorStatus(generator_id="ok", policy_version=0))
            assert await kv.progress() is None
            assert list(await kv.reports()) == ["generator.ok"]
        finally:
            await nc.close()

    asyncio.run(go())


class FlakyKV:
    """Fails the first `failures` puts like a bus in the middle of a restart."""

    def __init__(self, failures: int) -> None:
        self.failures, self.puts = failures, []

    async def put(self, key, value):
        if self.failures:
            self.failures -= 1
            raise asyncio.TimeoutError()
        self.puts.append(key)


def test_a_put_rides_out_a_hiccup_when_asked_to_and_says_so_otherwise():
    progress = LearnerProgress(step=1, total_steps=1, policy_version=1)
    once = JobKV(FlakyKV(failures=1))
    assert asyncio.run(once.put_progress(progress)) is False and once.kv.puts == []
    retried = JobKV(FlakyKV(failures=2))
    assert asyncio.run(retried.put_progress(progress, attempts=3)) is True and retried.kv.puts == [LEARNER_KEY]
    with pytest.raises(RuntimeError, match="after 2 tries"):
        asyncio.run(JobKV(FlakyKV(failures=5)).put_progress(progress, attempts=2))
