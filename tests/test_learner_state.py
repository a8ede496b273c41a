"""Learner checkpoints without a bus: the replay buffer and its sampler survive a restart."""

from __future__ import annotations

import asyncio
import time
import types

import pytest

from asyncrlhf.api import JobSpec
from asyncrlhf.bus import EmbeddedNats, JobBus, connect, latest_weights
from asyncrlhf.kv import JobKV
from asyncrlhf.learner import Learner
from asyncrlhf.messages import (
    GENERATOR_FORGET_SECONDS, GENERATOR_STALE_SECONDS, Completion, GeneratorStatus, RolloutGroup,
)
from asyncrlhf.snapshots import list_versions, write_snapshot


def groups(batch: int, n: int = 4, k: int = 3) -> list[RolloutGroup]:
    return [
        RolloutGroup(
            id=f"r-{batch}-{i}", prompt_id=f"p-{batch}-{i}", batch=batch, index=i, prompt_text=f"{batch} {i} =",
            prompt_token_ids=[1, 4 + batch % 10, 4 + i, 14],
            completions=[Completion(text="", token_ids=[4 + j, 4 + i, 2], logprobs=[-0.5, -0.4, -0.1], eos=True,
                                    score=j / k) for j in range(k)],
            policy_version=batch, generator_id="g",
        )
        for i in range(n)
    ]


def test_replay_state_survives_a_restart(tmp_path):
    spec = JobSpec.model_validate({
        "algorithm": {"loss": "tb", "samplesPerPrompt": 3},
        "learner": {"promptsPerStep": 4},
        "async": {"replayBuffer": {"recencyProbability": 0.5, "sampling": "reward"}},
    })
    bus = JobBus("default", "state")
    first = Learner.create(spec, bus, "", str(tmp_path / "vol"), str(tmp_path / "run"))
    for b in range(3):
        first.replay_sample(groups(b), b)
        first.replay.mark_sync()
    first.state.step = 3
    info = write_snapshot(first.root, 3, first.backend.save_weights)
    first.save_checkpoint(info)
    expected = [g.model_dump(exclude={"created"}) for g in first.replay_sample(groups(3), 3)]

    second = Learner.create(spec, bus, "", str(tmp_path / "vol"), str(tmp_path / "run"))
    assert second.state.step == 3 and len(second.replay) == 3 * 4 * 3
    assert [g.model_dump(exclude={"created"}) for g in second.replay_sample(groups(3), 3)] == expected


class FakeKV:
    def __init__(self, entries: dict[str, bytes]) -> None:
        self.entries = entries

    async def keys(self):
        return list(self.entries)

    async def get(self, key):
        return types.SimpleNamespace(value=self.entries[key])

    async def put(self, key, value):
        self.entries[key] = value

    async def delete(self, key):
        del self.entries[key]


def test_pruning_spares_live_generators_versions_but_not_gone_ones(tmp_path):
    """A generator still on v1 keeps snapshot v1; one that stopped reporting long ago does not
    (its pod is gone for good: a stale report must not keep a 16 GB snapshot forever)."""
    spec = JobSpec.model_validate({"weightSync": {"keepSnapshots": 2}})
    learner = Learner.create(spec, JobBus("default", "prune"), "", str(tmp_path / "vol"), str(tmp_path / "run"))
    for version in range(6):
        info = write_snapshot(learner.root, version, learner.backend.save_weights)
    learner.state.step = learner.state.published_version = 5
    learner.save_checkpoint(info)
    now = time.time()
    reports = {
        "generator.live": GeneratorStatus(generator_id="live", policy_version=1, updated=now - 5),
        "generator.gone": GeneratorStatus(generator_id="gone", policy_version=2, rollouts=7,
                                          updated=now - GENERATOR_STALE_SECONDS - 60),
        "generator.long-gone": GeneratorStatus(generator_id="long-gone", policy_version=0, rollouts=30, tokens=300,
                                               updated=now - GENERATOR_FORGET_SECONDS - 60),
        "learner": b"{}",  # other keys are not generator reports
    }
    kv = FakeKV({k: v.encode() if isinstance(v, GeneratorStatus) else v for k, v in reports.items()})
    asyncio.run(learner.prune(JobKV(kv)))
    assert list_versions(learner.root) == [1, 4, 5]
    # a generator gone for 15 minutes is folded into the retired summary: its rollouts still count
    assert "generator.long-gone" not in kv.entries and "generator.gone" in kv.entries
    retired = GeneratorStatus.decode(kv.entries["generator._retired"])
    assert (retired.rollouts, retired.tokens) == (30, 300) and not retired.fresh(now)
    kv.entries["generator.again"] = GeneratorStatus(generator_id="again", policy_version=0, rollouts=5,
                                                    updated=now - GENERATOR_FORGET_SECONDS - 1).encode()
    asyncio.run(learner.prune(JobKV(kv)))
    assert GeneratorStatus.decode(kv.entries["generator._retired"]).rollouts == 35
    assert sorted(kv.entries) == ["generator._retired", "generator.gone", "generator.live", "learner"]


def test_prompt_records_are_forgotten_once_trained_on_and_resume_at_the_same_place(tmp_path):
    spec = JobSpec.model_validate({"learner": {"promptsPerStep": 3}})
    bus = JobBus("default", "records")
    fresh = Learner.create(spec, bus, "", str(tmp_path / "a"), str(tmp_path / "run-a")).feeder
    expected = {b: [r.text for r in fresh.records(b)] for b in range(8)}
    assert len({t for texts in expected.values() for t in texts}) > 3  # distinct batches

    run = Learner.create(spec, bus, "", str(tmp_path / "b"), str(tmp_path / "run-b"))
    for step in range(6):
        assert [r.text for r in run.feeder.records(step)] == expected[step]
        assert [r.text for r in run.feeder.records(step + 1)] == expected[step + 1]  # released ahead
        run.state.rereleased[f"{step}:0"] = 1
        run.feeder.forget_before(step + 1)
        assert len(run.feeder.window) <= 3  # only batch step+1 is kept
        assert set(run.state.rereleased) == set()  # re-release counts of past batches go too
    with pytest.raises(IndexError, match="batch 2 was trained on"):
        run.feeder.records(2)

    resumed = Learner.create(spec, bus, "", str(tmp_path / "c"), str(tmp_path / "run-c"))
    resumed.state.step = 5  # as restore() leaves it
    assert [r.text for r in resumed.feeder.records(6)] == expected[6]
    assert [r.text for r in resumed.feeder.records(5)] == expected[5]


def test_a_restarted_learner_announces_its_checkpointed_snapshot_again(tmp_path):
    """Killed after a checkpoint and before announcing its snapshot, a learner would leave sync-mode
    generators waiting for that version for ever; the restarted one announces it first thing."""
    spec = JobSpec.model_validate({"async": {"mode": "sync"}, "learner": {"totalSteps": 3}})
    bus = JobBus("default", "reannounce")
    first = Learner.create(spec, bus, "", str(tmp_path / "vol"), str(tmp_path / "run"))
    first.state.step = first.state.published_version = 3
    info = write_snapshot(first.root, 3, first.backend.save_weights)
    first.save_checkpoint(info)  # ... and killed here: nothing announced

    async def restart_and_read() -> object:
        with EmbeddedNats() as server:
            restarted = Learner.create(spec, bus, server.url, str(tmp_path / "vol"), str(tmp_path / "run"))
            await restarted.run()  # step 3 of 3: announces, reports done, returns
            nc = await connect(server.url)
            try:
                return await latest_weights(nc.jetstream(), bus)
            finally:
                await nc.close()

    announced = asyncio.run(restart_and_read())
    assert announced is not None and announced.version == 3
    assert announced.checksum == info.checksum and announced.path == info.path


def test_a_snapshot_a_live_generator_refused_is_written_again_only_when_damaged_here_too(tmp_path):
    from asyncrlhf.messages import WeightsAnnouncement

    spec = JobSpec.model_validate({"learner": {"totalSteps": 9}})
    learner = Learner.create(spec, JobBus("default", "repair"), "", str(tmp_path / "vol"), str(tmp_path / "run"))
    learner.state.step = learner.state.published_version = 2
    info = write_snapshot(learner.root, 2, learner.backend.save_weights)
    learner.link.announced = WeightsAnnouncement(version=2, path=info.path, checksum=info.checksum)
    published = []

    async def publish_weights():
        published.append(learner.state.step)

    learner.publish_weights = publish_weights
    now = time.time()

    def reports(checksum: str, age: float = 5.0) -> None:
        learner.link.kv = JobKV(FakeKV({"generator.g0": GeneratorStatus(
            generator_id="g0", policy_version=1, refused_version=2, refused_checksum=checksum,
            updated=now - age).encode()}))

    reports("someone-else's")
    assert not asyncio.run(learner.repair_refused())
    reports(info.checksum)
    assert not asyncio.run(learner.repair_refused())  # refused, but sound here: the generator retries
    weights = next(p for p in (learner.root / "snapshots" / "v2").iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # damaged on the volume
    reports(info.checksum, age=GENERATOR_STALE_SECONDS + 10)
    assert not asyncio.run(learner.repair_refused())  # a generator gone for good does not count
    reports(info.checksum)
    assert asyncio.run(learner.repair_refused()) and published == [2]


def test_the_checkpoint_interval_is_chosen_from_the_real_model_size(tmp_path):
    from asyncrlhf.sizing import checkpoint_every_steps

    spec = JobSpec.model_validate({"weightSync": {"everySteps": 2}})
    learner = Learner.create(spec, JobBus("default", "size"), "", str(tmp_path / "vol"), str(tmp_path / "run"))
    params = sum(p.numel() for p in learner.backend.model.parameters())
    assert learner.backend.parameter_count == params > 0
    assert learner.checkpoint_every == checkpoint_every_steps(spec, params)
