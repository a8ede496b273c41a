"""Bus messages: typed, versioned, JSON; anything else is refused with a clear error."""

from __future__ import annotations

import json

import pytest

from asyncrlhf.bus import JobBus
from asyncrlhf.messages import Completion, LearnerProgress, MessageError, Prompt, RolloutGroup, WeightsAnnouncement


def group() -> RolloutGroup:
    return RolloutGroup(
        id="r-1", prompt_id="p-1", batch=3, index=1, prompt_text="3 1 =", prompt_token_ids=[1, 7, 5, 14],
        completions=[Completion(text="1 3", token_ids=[5, 7, 2], logprobs=[-0.1, -0.2, -0.3], eos=True, score=1.0)],
        policy_version=2, generator_id="g0",
    )


@pytest.mark.parametrize("msg", [
    group(),
    Prompt(id="p", batch=0, index=0, text="1 2 =", samples=4, min_version=0),
    WeightsAnnouncement(version=3, path="/s/v3", checksum="ab"),
    LearnerProgress(step=1, total_steps=2, policy_version=1, reward_mean=0.5),
])
def test_round_trip(msg):
    data = msg.encode()
    assert json.loads(data)["v"] == 1  # JSON on the wire, with its schema version
    assert type(msg).decode(data) == msg


def test_unknown_version_is_refused():
    data = json.loads(group().encode())
    data["v"] = 2
    with pytest.raises(MessageError, match="schema version 2"):
        RolloutGroup.decode(json.dumps(data).encode())


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("policy_version"),
    lambda d: d.update(extra=1),
    lambda d: d.update(batch=-1),
])
def test_malformed_is_refused(mutate):
    data = json.loads(group().encode())
    mutate(data)
    with pytest.raises(MessageError, match="invalid rollout message"):
        RolloutGroup.decode(json.dumps(data).encode())


def test_not_json_is_refused():
    with pytest.raises(MessageError):
        Prompt.decode(b"\x80\x04pickle")


def test_names_of_a_job():
    bus = JobBus("team-a", "tiny-sort")
    assert bus.subject("rollouts") == "asyncrlhf.team-a.tiny-sort.rollouts"
    assert bus.stream == "ARJ_team-a_tiny-sort"
    assert bus.bucket == "arj_team-a_tiny-sort"
    config = bus.stream_config(1 << 20)
    assert config.retention.value == "workqueue" and config.discard.value == "new"
    assert sorted(c.durable_name for c in bus.consumer_configs(30)) == ["generators", "learner", "reward"]


def test_a_generator_report_is_fresh_for_two_minutes_and_busy_generators_keep_reporting(monkeypatch):
    import asyncio
    import types

    from asyncrlhf import generator as generator_module
    from asyncrlhf.messages import GENERATOR_HEARTBEAT_SECONDS, GENERATOR_STALE_SECONDS, GeneratorStatus

    report = GeneratorStatus(generator_id="g", policy_version=3, updated=1000.0)
    assert report.fresh(1000.0 + GENERATOR_STALE_SECONDS) and not report.fresh(1000.1 + GENERATOR_STALE_SECONDS)
    assert GENERATOR_HEARTBEAT_SECONDS * 4 <= GENERATOR_STALE_SECONDS  # missing a few beats is not death

    # the heartbeat reports on its own, whatever the generator is doing (a long generation runs
    # in a thread and blocks nothing here)
    monkeypatch.setattr(generator_module, "GENERATOR_HEARTBEAT_SECONDS", 0.02)
    reports = []

    async def report(kv) -> None:
        reports.append(kv)

    async def beat_for(seconds: float) -> None:
        task = asyncio.create_task(generator_module.Generator._heartbeat(types.SimpleNamespace(report=report), "kv"))
        await asyncio.sleep(seconds)
        task.cancel()

    asyncio.run(beat_for(0.3))
    assert len(reports) >= 5 and set(reports) == {"kv"}
