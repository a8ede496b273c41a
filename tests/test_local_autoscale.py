"""`asyncrlhf run`'s generators as a set that scales (local_generators.py) and the autoscaler loop
that drives it (local_autoscale.py): real (cheap) processes in place of generators, synthetic bus
signals in place of a job."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from asyncrlhf.api import AsyncRLHFJob
from asyncrlhf.console import scale_line
from asyncrlhf.local_autoscale import AUTOSCALE_KIND, LocalAutoscaler, generator_slots
from asyncrlhf.local_generators import STOP_GRACE_SECONDS, Child, GeneratorPool, stop_all
from asyncrlhf.messages import GeneratorStatus, LearnerProgress
from asyncrlhf.placement import PlacementError
from asyncrlhf.report import read_metrics
from asyncrlhf.telemetry import LocalPorts
from asyncrlhf.workload_env import GENERATOR_ID

SLEEPER = ["sleep", "120"]
STUBBORN = ["sh", "-c", "trap '' TERM; echo ready; sleep 120"]  # SIGTERM ignored, by its sleep too


class FakeLaunch:
    """Starts a cheap process for each generator and remembers each one's environment."""

    def __init__(self, command=SLEEPER) -> None:
        self.command, self.envs = command, {}

    def __call__(self, role, index, attempt, config, run_dir, env, cores) -> Child:
        self.envs[(index, attempt)] = env
        proc = subprocess.Popen(self.command, start_new_session=True, stdout=subprocess.PIPE, text=True)
        return Child(role, index, proc, attempt)


@pytest.fixture
def pool(tmp_path):
    restarts = []
    made = GeneratorPool(tmp_path / "job.yaml", tmp_path, lambda extra: {"BASE": "1"} | extra,
                         cores=[[1], [2]], devices=[], ports=LocalPorts(0), launcher=FakeLaunch(),
                         on_restart=lambda index, code: restarts.append((index, code)))
    made.restarts = restarts
    yield made
    stop_all(made.children, timeout=0.5)


def _wait_exit(child: Child) -> int:
    return child.proc.wait(10)


def test_scale_up_starts_fresh_ids_and_down_stops_the_newest_gracefully(pool):
    pool.scale_to(3)
    assert [(c.index, c.attempt, c.slot) for c in pool.members()] == [(0, 0, 0), (1, 0, 1), (2, 0, 2)]
    assert pool.ids() == {"gen-0-0", "gen-1-0", "gen-2-0"} and pool.running() == 3
    env = pool.launcher.envs[(2, 0)]
    assert env[GENERATOR_ID] == "gen-2-0" and env["BASE"] == "1" and env["OMP_NUM_THREADS"] == "1"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1"  # slot 2 past the two core sets: round-robin

    pool.scale_to(1)
    gone = [c for c in pool.children if c.index in (1, 2)]
    assert all(c.stopped_at is not None for c in gone) and pool.size == 1 and pool.ids() == {"gen-0-0"}
    assert [_wait_exit(c) for c in gone] == [-signal.SIGTERM] * 2  # SIGTERM, as a pod's stop
    assert pool.check() is None and pool.restarts == []  # stopped generators are not restarted
    assert all(c.reaped for c in gone)

    pool.scale_to(2)  # a new generator: a new index (its id and KV report are its own), a free slot
    assert [(c.index, c.attempt, c.slot) for c in pool.members()] == [(0, 0, 0), (3, 0, 1)]


def test_a_generator_that_dies_is_restarted_in_its_slot_and_its_attempts_count(pool):
    pool.scale_to(2)
    for attempt in (0, 1):
        victim = pool.latest()[1]
        victim.proc.kill()
        _wait_exit(victim)
        assert pool.check() is None
        assert pool.latest()[1].attempt == attempt + 1 and pool.latest()[1].slot == 1
    assert pool.restarts == [(1, -signal.SIGKILL)] * 2
    assert pool.ids() == {"gen-0-0", "gen-1-2"} and pool.size == 2
    assert [(c.index, c.attempt) for c in pool.children] == [(0, 0), (1, 0), (1, 1), (1, 2)]


def test_a_generator_that_refuses_its_input_is_not_restarted(pool):
    pool.launcher.command = ["sh", "-c", "exit 2"]
    pool.scale_to(1)
    _wait_exit(pool.children[0])
    refused = pool.check()
    assert refused is pool.children[0] and refused.proc.returncode == 2 and len(pool.children) == 1


def test_a_stopped_generator_that_ignores_sigterm_is_killed_after_the_grace(pool):
    pool.launcher.command = STUBBORN
    pool.scale_to(2)
    newest = pool.latest()[1]
    assert newest.proc.stdout.readline().strip() == "ready"  # its SIGTERM handler is in place
    pool.scale_to(1)
    pool.check()
    assert newest.proc.poll() is None and not newest.reaped  # within the grace: still stopping
    pool.check(now=newest.stopped_at + STOP_GRACE_SECONDS + 1)
    assert _wait_exit(newest) == -signal.SIGKILL and newest.reaped
    assert pool.free_slot() == 1


def test_per_process_settings_come_last(pool):
    pool.env_for = lambda index: {"ASYNCRLHF_GROUP": f"g{index % 2}", "OMP_NUM_THREADS": "7"}
    pool.scale_to(2)
    assert pool.launcher.envs[(1, 0)]["ASYNCRLHF_GROUP"] == "g1"
    assert pool.launcher.envs[(0, 0)]["OMP_NUM_THREADS"] == "7"


# --- the autoscaler loop, from synthetic bus signals -----------------------------------------


def _spec(**autoscale):
    auto = {"enabled": True, "minReplicas": 1, "maxReplicas": 3, "stabilizationSeconds": 0,
            "intervalSeconds": 5} | autoscale
    return AsyncRLHFJob.model_validate({
        "apiVersion": "asyncrlhf.dev/v1alpha1", "kind": "AsyncRLHFJob", "metadata": {"name": "auto"},
        "spec": {"generator": {"engine": "hf", "replicas": 1, "autoscale": auto},
                 "learner": {"promptsPerStep": 4, "totalSteps": 50}, "async": {"maxStaleness": 1}},
    }).spec


def _learner(step: int, uptime: float, waited: float) -> LearnerProgress:
    return LearnerProgress(step=step, total_steps=50, policy_version=step, uptime_seconds=uptime,
                           rollout_wait_seconds=waited, prompts_pending=0)


def _report(gid: str, now: float, uptime: float, busy: float, idle: float = 0.0) -> GeneratorStatus:
    return GeneratorStatus(generator_id=gid, policy_version=0, busy_seconds=busy, prompt_wait_seconds=idle,
                           uptime_seconds=uptime, updated=now)


def test_a_starved_learner_scales_the_generators_up_and_the_decision_is_recorded(pool, tmp_path):
    t0 = 1_000_000.0
    scaler = LocalAutoscaler(_spec(), pool, tmp_path, limit=3, started=t0)
    pool.scale_to(1)
    assert not scaler.due(t0 + 4.9) and scaler.due(t0 + 5)
    # the first read measures nothing; a stale report from a generator the run no longer has is ignored
    first = {"generator.gen-0-0": _report("gen-0-0", t0 + 5, 5, 4),
             "generator.gen-9-0": _report("gen-9-0", t0 + 5, 5, 0, idle=5)}
    assert scaler.step(_learner(1, 10, 2), first, now=t0 + 5) is None
    assert scaler.last_reason.startswith("first read") and pool.size == 1
    # 10 s later the learner has waited 6 of them: 60% > 10% -> ceil(1 x 0.9 / 0.4) = 3, but only
    # (maxStaleness + 1) x 1 fetch per step = 2 generators can be busy at once
    later = {"generator.gen-0-0": _report("gen-0-0", t0 + 15, 15, 14)}
    record = scaler.step(_learner(3, 20, 8), later, now=t0 + 15)
    assert record["from"] == 1 and record["to"] == 2 and record["step"] == 3 and record["interval_seconds"] == 10
    assert record["signals"]["learner_wait_fraction"] == pytest.approx(0.6)
    assert pool.size == 2 and pool.ids() == {"gen-0-0", "gen-1-0"}
    assert scale_line(record) == "generators 1 → 2: the learner waited 60% of the last 10 s (target 10%)"
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [record] and lines[0]["kind"] == AUTOSCALE_KIND
    assert read_metrics(tmp_path) == []  # not a training step
    # gen-1-0 has not reported yet: no decision while it starts, even though the learner still waits
    assert scaler.step(_learner(4, 30, 17), {"generator.gen-0-0": _report("gen-0-0", t0 + 25, 25, 24)},
                       now=t0 + 25) is None
    assert scaler.last_reason == "waiting for 1 generators to start" and pool.size == 2
    summary = scaler.summary()
    assert summary["decisions"] == [record] and summary["generators"] == 2 and summary["intervals"] == 2


def test_idle_generators_scale_down_to_min_replicas_and_no_further(pool, tmp_path):
    t0 = 2_000_000.0
    scaler = LocalAutoscaler(_spec(maxStep=1), pool, tmp_path, limit=3, started=t0)
    pool.scale_to(2)
    reports = lambda t, idle: {f"generator.{g}": _report(g, t, t - t0, 0.1 * (t - t0), idle) for g in pool.ids()}
    scaler.step(_learner(1, 10, 0), reports(t0 + 10, 8), now=t0 + 10)
    record = scaler.step(_learner(2, 20, 0), reports(t0 + 20, 17), now=t0 + 20)  # idled 90% of 10 s
    assert (record["from"], record["to"]) == (2, 1) and pool.ids() == {"gen-0-0"}
    assert scaler.step(_learner(3, 30, 0), reports(t0 + 30, 26), now=t0 + 30) is None  # minReplicas 1
    assert pool.size == 1


def test_scaling_up_is_capped_where_the_machine_has_no_gpus_for_more(pool, tmp_path):
    t0 = 3_000_000.0
    scaler = LocalAutoscaler(_spec(), pool, tmp_path, limit=1, started=t0)
    pool.scale_to(1)
    scaler.step(_learner(1, 10, 0), {"g": _report("gen-0-0", t0 + 5, 5, 5)}, now=t0 + 5)
    assert scaler.step(_learner(2, 20, 9), {"g": _report("gen-0-0", t0 + 15, 15, 15)}, now=t0 + 15) is None
    assert pool.size == 1 and "capped at 1" in scaler.last_reason


def test_on_gpus_a_generator_still_stopping_holds_its_slot(pool, tmp_path):
    t0 = 4_000_000.0
    spec = _spec()
    spec.generator.resources.gpus = 1
    scaler = LocalAutoscaler(spec, pool, tmp_path, limit=2, started=t0)
    pool.scale_to(2)
    pool.scale_to(1)
    assert pool.stopping() == 1
    scaler.step(_learner(1, 10, 0), {"g": _report("gen-0-0", t0 + 5, 5, 5)}, now=t0 + 5)
    assert scaler.step(_learner(2, 20, 9), {"g": _report("gen-0-0", t0 + 15, 15, 15)}, now=t0 + 15) is None
    assert "capped at 1" in scaler.last_reason and pool.size == 1
    _wait_exit(pool.latest()[1])
    pool.check()  # gone: its slot is free
    record = scaler.step(_learner(3, 30, 18), {"g": _report("gen-0-0", t0 + 25, 25, 25)}, now=t0 + 25)
    assert (record["from"], record["to"]) == (1, 2) and pool.members()[1].slot == 1


def test_generator_slots_place_up_to_max_replicas_on_the_gpus_there_are():
    spec = _spec(maxReplicas=4)
    spec.generator.resources.gpus = 1
    spec.learner.gpus_per_node = 1
    assert [s["CUDA_VISIBLE_DEVICES"] for s in generator_slots(spec, ["0", "1", "2"])] == ["1", "2"]
    assert len(generator_slots(spec, [str(i) for i in range(8)])) == 4
    with pytest.raises(PlacementError):  # not even replicas fit: refused as without autoscale
        generator_slots(spec, ["0"])
    spec.generator.autoscale.enabled = False
    assert [s["CUDA_VISIBLE_DEVICES"] for s in generator_slots(spec, ["0", "1", "2"])] == ["1"]
    cpu = _spec(maxReplicas=4)
    assert generator_slots(cpu, []) == [{}] * 4


# --- a real local run ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_local_run_whose_learner_is_starved_adds_a_generator(tmp_path, monkeypatch):
    """One HF generator that pauses 5 s after each of its first generations: the learner waits for
    nearly every interval, so the first measured interval scales 1 → 2 (two can be busy: N = 1)."""
    import asyncio

    from asyncrlhf.local import LocalRun
    from test_core_loop import tiny_job

    monkeypatch.setenv("ASYNCRLHF_FAULT", ",".join(f"generate:{n}:pause" for n in range(1, 7)))
    job = tiny_job("autoscaled", generator={"engine": "hf", "replicas": 1, "autoscale": {
        "enabled": True, "minReplicas": 1, "maxReplicas": 3, "intervalSeconds": 5, "stabilizationSeconds": 0}},
        learner={"totalSteps": 6, "promptsPerStep": 4}, **{"async": {"maxStaleness": 1}})
    run = LocalRun(job, tmp_path / "autoscaled", quiet=True)
    result = asyncio.run(run.run())

    assert result.ok and result.summary["steps"] == 6
    decisions = result.summary["autoscale"]["decisions"]
    assert decisions and (decisions[0]["from"], decisions[0]["to"]) == (1, 2), result.summary["autoscale"]
    assert decisions[0]["signals"]["learner_wait_fraction"] > 0.1 and "learner waited" in decisions[0]["reason"]
    assert all(d["to"] <= 2 for d in decisions)  # never past what N = 1 can keep busy
    lines = (run.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines if '"kind": "autoscale"' in line] == decisions
    assert [c.index for c in run.children if c.role == "generator"][:2] == [0, 1]  # a fresh generator
    assert result.summary["rollouts_consumed"] == 6 * 4  # nothing lost or repeated by the change


def test_stop_all_reports_how_each_running_child_ended():
    polite = Child("generator", 0, subprocess.Popen(SLEEPER, start_new_session=True))
    stubborn = Child("learner", 0, subprocess.Popen(STUBBORN, start_new_session=True, stdout=subprocess.PIPE, text=True))
    assert stubborn.proc.stdout.readline().strip() == "ready"  # its trap is set
    gone = Child("generator", 1, subprocess.Popen(["true"], start_new_session=True))
    gone.proc.wait()
    ended = stop_all([polite, stubborn, gone], timeout=1.0)
    assert [(s.name, s.killed) for s in ended] == [("generator-0", False), ("learner-0", True)]  # not the one already gone
    assert ended[0].seconds < 1.0 <= ended[1].seconds
    assert str(ended[1]).startswith("learner-0 killed after ") and str(ended[0]).startswith("generator-0 0.")
    assert polite.proc.returncode == -signal.SIGTERM and stubborn.proc.returncode == -signal.SIGKILL
