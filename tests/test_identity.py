"""A job never takes over what an earlier job of the same name left (asyncrlhf/identity.py): the
volume's state is moved aside, the stream and KV bucket are made again; without a UID (local
runs) or with none recorded (made before UIDs), nothing is touched."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from asyncrlhf import api, workload_env
from asyncrlhf.bus import PROMPTS, EmbeddedNats, JobBus, connect, ensure_job_resources, publish
from asyncrlhf.identity import PREVIOUS_DIR, UID_KEY, UID_METADATA, VOLUME_FILE, claim_volume, differs
from asyncrlhf_operator import plan
from asyncrlhf_operator.jetstream import job_bus


@pytest.mark.parametrize("mine,recorded,leftover", [
    ("b", "a", True), ("a", "a", False), ("", "a", False), ("a", "", False), ("", "", False)])
def test_only_two_known_and_different_uids_mean_leftovers(mine, recorded, leftover):
    assert differs(mine, recorded) is leftover


def earlier_job(root: Path, uid: str = "") -> None:
    (root / "checkpoints" / "step-4").mkdir(parents=True)
    (root / "checkpoints" / "LATEST").write_text("step-4")
    (root / "snapshots" / "v4").mkdir(parents=True)
    (root / "report").mkdir()
    (root / "report" / "ledger.jsonl").write_text("{}\n")
    (root / "lost+found").mkdir()
    if uid:
        (root / VOLUME_FILE).write_text(uid)


def test_the_volume_of_an_earlier_job_is_moved_aside_and_nothing_is_deleted(tmp_path):
    earlier_job(tmp_path, uid="old")
    moved = claim_volume(tmp_path, "new")
    assert moved == tmp_path / PREVIOUS_DIR / "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["JOB_UID", "lost+found", "previous"]
    assert (moved / "checkpoints" / "LATEST").read_text() == "step-4" and (moved / "report" / "ledger.jsonl").exists()
    assert (tmp_path / VOLUME_FILE).read_text() == "new"
    assert claim_volume(tmp_path, "new") is None  # the same job again (a restarted learner): nothing moves
    (tmp_path / "checkpoints").mkdir()
    assert claim_volume(tmp_path, "third") == tmp_path / PREVIOUS_DIR / "new"
    assert sorted(p.name for p in (tmp_path / PREVIOUS_DIR).iterdir()) == ["new", "old"]


@pytest.mark.parametrize("recorded,uid", [("", "new"), ("old", "")], ids=["none-recorded-adopted", "no-uid-local-run"])
def test_no_uid_on_either_side_moves_nothing(tmp_path, recorded, uid):
    earlier_job(tmp_path, uid=recorded)
    assert claim_volume(tmp_path, uid) is None
    assert (tmp_path / "checkpoints" / "LATEST").exists()
    assert (tmp_path / VOLUME_FILE).read_text() == (uid or recorded)  # adopted, or left as it was


async def _bus_case(url: str) -> dict:
    nc = await connect(url)
    js = nc.jetstream()
    out = {}

    async def state(bus: JobBus) -> tuple[int, str, str]:
        info = await js.stream_info(bus.stream)
        kv = await js.key_value(bus.bucket)
        try:
            recorded = (await kv.get(UID_KEY)).value.decode()
        except Exception:  # noqa: BLE001 -- no key
            recorded = ""
        return info.state.messages, (info.config.metadata or {}).get(UID_METADATA, ""), recorded

    old = JobBus("team", "demo")  # made before UIDs (or by asyncrlhf run)
    await ensure_job_resources(js, old, 1 << 20, 30.0)
    await publish(js, old.subject(PROMPTS), b"left over", msg_id="p0-0")
    first = JobBus("team", "demo", uid="uid-1")
    await ensure_job_resources(js, first, 1 << 20, 30.0)
    out["adopted"] = await state(first)
    await ensure_job_resources(js, first, 1 << 20, 30.0)
    out["same job again"] = await state(first)
    await ensure_job_resources(js, JobBus("team", "demo"), 1 << 20, 30.0)
    out["no uid"] = await state(first)
    second = JobBus("team", "demo", uid="uid-2")
    await ensure_job_resources(js, second, 1 << 20, 30.0)
    out["another job"] = await state(second)
    await nc.close()
    return out


def test_a_stream_and_bucket_of_an_earlier_job_are_made_again():
    with EmbeddedNats() as server:
        seen = asyncio.run(_bus_case(server.url))
    assert seen["adopted"] == (1, "uid-1", "uid-1")  # its prompt kept, the UID recorded
    assert seen["same job again"] == (1, "uid-1", "uid-1")
    assert seen["no uid"][0] == 1  # a workload without a UID checks nothing
    assert seen["another job"] == (0, "uid-2", "uid-2")  # the earlier job's prompt is gone


def test_the_operator_gives_the_learner_the_jobs_uid_and_records_it_on_the_bus():
    owner = plan.Owner(name="demo", namespace="team", uid="0b8c4a4e-6b9e-4c55-9d5e-1f0c3a9b7d21")
    job = api.AsyncRLHFJob.model_validate({"metadata": {"name": "demo", "namespace": "team", "uid": owner.uid},
                                           "spec": {}})
    learner = next(c for c in plan.desired_children(job, owner, "nats://nats:4222") if c["kind"] == "Job")
    env = {e["name"]: e.get("value") for e in learner["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env[workload_env.JOB_UID] == owner.uid
    assert workload_env.WorkloadEnv.for_learner(env).job_uid == owner.uid
    assert job_bus(job).uid == owner.uid and job_bus(job) == JobBus("team", "demo")  # names only compare


def test_a_volume_the_job_names_is_adopted_to_resume_from(tmp_path):
    """weightSync.volumeClaim: e.g. a PVC restored from a VolumeSnapshot of another job (docs/operator.md)."""
    earlier_job(tmp_path, uid="old")
    assert claim_volume(tmp_path, "new", adopt=True) is None
    assert (tmp_path / "checkpoints" / "LATEST").read_text() == "step-4"
    assert (tmp_path / VOLUME_FILE).read_text() == "new"
