"""The generator autoscaler's policy (autoscale.py): tables, and the simulated job of bench/autoscale_sim.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from asyncrlhf.api import AutoscaleSpec, JobSpec
from asyncrlhf.autoscale import Autoscaler, Past, Proposal, Signals, decide, propose, useful_limit

SPEC = AutoscaleSpec(enabled=True, min_replicas=1, max_replicas=8, max_step=2, stabilization_seconds=60,
                     interval_seconds=20)


def signals(n=2, ready=None, wait=0.0, idle=0.0, pending=0, per_step=64, fetch=8, staleness=2) -> Signals:
    return Signals(replicas=n, ready=n if ready is None else ready, learner_wait_fraction=wait,
                   generator_idle_fraction=idle, prompts_pending=pending, prompts_per_step=per_step,
                   fetch_size=fetch, max_staleness=staleness)


@pytest.mark.parametrize("s, expected, reason", [
    (signals(2, wait=0.5), 4, "learner waited 50%"),  # 2 * 0.9 / 0.5 = 3.6
    (signals(2, wait=0.15), 3, "learner waited"),  # 2.1 -> 3: at least one more
    (signals(2, wait=0.1), 2, "balanced"),  # at the target: hold
    (signals(0, wait=1.0), 1, "no generator is serving"),
    (signals(3, wait=0.9, per_step=8, fetch=8, staleness=1), 3, "already take every prompt"),  # limit 2: hold
    (signals(2, wait=0.9, per_step=8, fetch=8, staleness=2), 3, "learner waited"),  # 18 wanted, limit 3
    (signals(4, idle=0.6), 3, "idled 60%"),  # 4 * 0.4 / 0.7 = 2.3 -> 3
    (signals(4, idle=0.9), 1, "idled 90%"),  # 4 * 0.1 / 0.7 = 0.57 -> 1
    (signals(4, idle=0.6, pending=200), 4, "balanced"),  # prompts wait: the idle time is not for lack of work
    (signals(4, idle=0.2), 4, "balanced"),
    (signals(2, wait=0.5, idle=0.9), 4, "learner waited"),  # a starved learner wins
])
def test_propose(s, expected, reason):
    proposal = propose(SPEC, s)
    assert proposal.replicas == expected and reason in proposal.reason


def test_useful_limit_is_the_prompts_in_flight_in_fetches():
    assert useful_limit(signals(per_step=64, fetch=8, staleness=2)) == 24
    assert useful_limit(signals(per_step=10, fetch=4, staleness=0)) == 3


@pytest.mark.parametrize("s, proposal, history, now, last_change, expected, changed, reason", [
    (signals(2), 7, (), 100, 0, 4, True, "up"),  # max step 2
    (signals(2), 3, (), 100, 0, 3, True, "up"),
    (signals(7), 12, (), 100, 0, 8, True, "up"),  # maxReplicas
    (signals(2, ready=1), 4, (), 100, 0, 2, False, "waiting for 1 generators to start"),
    (signals(2), 4, (), 100, 50, 2, False, "changed less than"),
    (signals(5), 1, (Past(50, 3), Past(70, 4)), 100, 0, 4, True, "down"),  # the window's largest
    (signals(5), 1, (Past(50, 5), Past(70, 4)), 100, 0, 5, False, "whole window agrees"),
    (signals(5), 1, (Past(10, 5), Past(70, 3)), 100, 0, 3, True, "down"),  # t=10 left the window
    (signals(5), 1, (), 100, 0, 3, True, "down"),  # max step
    (signals(2), 0, (), 100, 0, 1, True, "down"),  # minReplicas
    (signals(12), 12, (), 100, 99, 8, True, "outside minReplicas..maxReplicas"),  # bounds first, at once
])
def test_decide(s, proposal, history, now, last_change, expected, changed, reason):
    decision = decide(SPEC, s, Proposal(proposal, reason), history, now, last_change)
    assert (decision.replicas, decision.changed) == (expected, changed)
    assert reason in decision.reason


def test_the_autoscaler_keeps_its_window_and_waits_after_a_change():
    scaler = Autoscaler(SPEC, last_change=0.0)
    assert scaler.step(signals(2, wait=0.5), 20).changed is False  # within the start's window
    first = scaler.step(signals(2, wait=0.5), 60)
    assert (first.replicas, first.changed) == (4, True)
    assert scaler.step(signals(4, wait=0.5), 80).replicas == 4  # 20 s after the change: held
    assert all(80 - p.time <= SPEC.stabilization_seconds for p in scaler.history)


@pytest.mark.parametrize("autoscale, replicas, ok", [
    ({"enabled": True, "minReplicas": 2, "maxReplicas": 6}, 2, True),
    ({"enabled": True, "minReplicas": 2, "maxReplicas": 6}, 1, False),  # replicas is the autoscaler's
    ({"enabled": True, "minReplicas": 5, "maxReplicas": 3}, 4, False),
    ({"enabled": False, "minReplicas": 5, "maxReplicas": 3}, 1, True),  # off: not checked
])
def test_spec_rules(autoscale, replicas, ok):
    raw = {"generator": {"replicas": replicas, "autoscale": autoscale}}
    if ok:
        JobSpec.model_validate(raw)
    else:
        with pytest.raises(ValueError, match="autoscale|replicas"):
            JobSpec.model_validate(raw)


def _sim():
    path = Path(__file__).resolve().parents[1] / "bench" / "autoscale_sim.py"
    spec = importlib.util.spec_from_file_location("autoscale_sim", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("ratio", [1.5, 3.0, 5.0])
def test_the_simulated_job_converges_without_oscillating(ratio):
    sim = _sim()
    job = sim.Job(learner_rate=16.0 * ratio, generator_rate=16.0)
    result = sim.simulate(job, seconds=1200.0, slowdown_at=600.0)  # as the bench runs it
    for phase, start, end, right in (("before", 0, 600.0, result["right_before"]),
                                     ("after", 600.0, 1201.0, result["right_after"])):
        settled = sim.converged(result["decisions"], start, end)
        # the right count, or one more where the right count puts the learner exactly at its target wait
        assert right <= settled["final"] <= right + 1, (phase, settled)
        assert settled["decisions_to_settle"] <= 12 and settled["reversals"] == 0, (phase, settled)


# ---------------------------------------------------------------------------------------------
# observe: two reads of the job's KV bucket -> one interval's signals

from asyncrlhf.autoscale import SERVING_SECONDS, Sample, generator_idle, grew, learner_wait, observe  # noqa: E402
from asyncrlhf.messages import RETIRED_GENERATORS, GeneratorStatus, LearnerProgress  # noqa: E402

JOB = JobSpec.model_validate({"learner": {"promptsPerStep": 8}, "async": {"maxStaleness": 2}})


def learner(uptime, wait, *, pending=None, done=False, failed="") -> LearnerProgress:
    return LearnerProgress(step=3, total_steps=100, policy_version=3, uptime_seconds=uptime,
                           rollout_wait_seconds=wait, prompts_pending=pending, done=done, failed=failed)


def gen(gid, uptime, prompt=0.0, weights=0.0, busy=0.0, updated=1000.0) -> GeneratorStatus:
    return GeneratorStatus(generator_id=gid, policy_version=3, uptime_seconds=uptime, prompt_wait_seconds=prompt,
                           weights_wait_seconds=weights, busy_seconds=busy, updated=updated)


@pytest.mark.parametrize("before, after, expected", [
    (10.0, 25.0, 15.0), (10.0, 10.0, 0.0), (10.0, 3.0, None),  # went down: a restart
])
def test_grew(before, after, expected):
    assert grew(before, after) == expected


@pytest.mark.parametrize("prev, now, fraction, why", [
    (learner(100, 10), learner(130, 22), 0.4, ""),  # 12 of 30 s
    (learner(100, 10), learner(130, 10), 0.0, ""),
    (learner(100, 10), learner(130, 50), 1.0, ""),  # (clipped: cannot wait more than the interval)
    (None, learner(130, 22), None, "first read"),
    (learner(100, 10), None, None, "no learner progress"),
    (learner(100, 10), learner(20, 5), None, "restarted"),  # uptime went down
    (learner(100, 10), learner(130, 5), None, "restarted"),  # a counter went down
    (learner(100, 10), learner(100, 10), None, "has not reported"),  # the same report read twice
    (learner(0, 0), learner(0, 0), None, "has not reported"),  # a learner without the counters (older image)
    (learner(100, 10), learner(130, 22, done=True), None, "finished"),
    (learner(100, 10), learner(130, 22, failed="oom"), None, "finished"),
])
def test_learner_wait(prev, now, fraction, why):
    got, reason = learner_wait(prev, now)
    assert got == (pytest.approx(fraction) if fraction is not None else None) and why in reason


@pytest.mark.parametrize("prev, now, expected", [
    (gen("a", 100, 5, 5, 80), gen("a", 140, 25, 15, 90), 0.75),  # (20 + 10) / 40
    (gen("a", 100, 5, 5, 80), gen("a", 140, 5, 5, 120), 0.0),
    (None, gen("a", 140, 25, 15), None),  # new generator: no interval yet
    (gen("a", 100, 5, 5), gen("a", 10, 1, 0), None),  # restarted (same pod name, new process)
    (gen("a", 100, 5, 5), gen("a", 140, 4, 5), None),  # a counter went down
    (gen("a", 100, 5, 5, 80), gen("a", 140, 25, 15, 70), None),  # busy went down
    (gen("a", 100, 5, 5), gen("a", 100, 5, 5), None),  # no report since the last read
])
def test_generator_idle(prev, now, expected):
    got = generator_idle(prev, now)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_observe_builds_the_policy_input_from_two_reads():
    t0, t1 = 1000.0, 1030.0
    prev = Sample(t0, learner(100, 10), {"generator.a": gen("a", 50, 0, 0, updated=t0),
                                        "generator.b": gen("b", 60, 0, 0, updated=t0)})
    now = Sample(t1, learner(130, 25, pending=3), {
        "generator.a": gen("a", 80, 12, 0, updated=t1),  # 12/30 idle
        "generator.b": gen("b", 90, 3, 6, updated=t1 - 10),  # 9/30 idle
        "generator.c": gen("c", 5, 5, 0, updated=t1),  # new: serving, not measured
        "generator.d": gen("d", 900, 0, 0, updated=t1 - SERVING_SECONDS - 1),  # scaled down: gone
        f"generator.{RETIRED_GENERATORS}": gen(RETIRED_GENERATORS, 0, updated=t1),
    })
    obs = observe(prev, now, JOB, replicas=3)
    s = obs.signals
    assert obs.reason == "" and obs.generators_measured == 2
    assert s.learner_wait_fraction == pytest.approx(0.5) and s.generator_idle_fraction == pytest.approx(0.35)
    assert (s.replicas, s.ready, s.prompts_pending) == (3, 3, 3)
    assert (s.prompts_per_step, s.fetch_size, s.max_staleness) == (8, 8, 2)
    assert observe(prev, now, JOB, replicas=3, ready=2).signals.ready == 2  # what the platform says caps it
    assert observe(prev, now, JOB, replicas=2).signals.ready == 2  # more reports than wanted: scaling down
    assert observe(prev, now, JOB, replicas=3, fetch_size=2).signals.fetch_size == 2


def test_observe_without_measures_never_asks_for_fewer():
    now = Sample(1030.0, learner(130, 25), {"generator.a": gen("a", 5, updated=1030.0)})
    s = observe(Sample(1000.0, learner(100, 10)), now, JOB, replicas=1).signals
    assert s.generator_idle_fraction == 0.0 and s.prompts_pending == 8  # unknown backlog: a step's
    assert observe(None, now, JOB, replicas=1).signals is None  # first read


def test_a_missed_read_makes_one_longer_interval():
    """Counters are cumulative: skipping the middle read gives the mean of both halves."""
    a, b, c = learner(100, 0), learner(130, 30), learner(160, 30)
    whole = observe(Sample(0, a), Sample(60, c), JOB, replicas=1).signals.learner_wait_fraction
    assert whole == pytest.approx(0.5)
    assert observe(Sample(0, a), Sample(30, b), JOB, replicas=1).signals.learner_wait_fraction == 1.0


# ---------------------------------------------------------------------------------------------
# The learner's heartbeat: its counters reach the bus mid-step and while it waits

import asyncio  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from asyncrlhf import learner as learner_module  # noqa: E402


def _learner_stub(step: int, row, total: int = 10):
    written: list = []

    class KV:
        async def put_progress(self, progress, attempts=1):
            written.append(progress)

    stub = SimpleNamespace(state=SimpleNamespace(step=step), spec=SimpleNamespace(learner=SimpleNamespace(
        total_steps=total)), _row=row, _progress_lock=asyncio.Lock(), link=SimpleNamespace(kv=KV()),
        progress=lambda row, done=False: ("progress", row))
    stub.heartbeat_due = lambda: learner_module.Learner.heartbeat_due(stub)
    return stub, written


@pytest.mark.parametrize("step, row, due", [
    (0, None, True),  # a new learner waiting for its first batch: its wait must show
    (4, {"reward_mean": 0.5}, True),
    (4, None, False),  # resumed, before its first step: its reward is not known (status would lose it)
    (10, {"reward_mean": 0.5}, False),  # done: the final progress is the last word
])
def test_the_learner_heartbeat_is_due(step, row, due):
    assert _learner_stub(step, row)[0].heartbeat_due() is due


def test_the_learner_heartbeat_writes_the_progress_again_and_again(monkeypatch):
    monkeypatch.setattr(learner_module, "LEARNER_HEARTBEAT_SECONDS", 0.001)
    stub, written = _learner_stub(4, {"reward_mean": 0.5})

    async def run():
        task = asyncio.create_task(learner_module.Learner.heartbeat(stub))
        while len(written) < 3:
            await asyncio.sleep(0.001)
        task.cancel()

    asyncio.run(asyncio.wait_for(run(), 10))
    assert written[:3] == [("progress", {"reward_mean": 0.5})] * 3


def test_reports_written_before_the_autoscaler_counters_still_decode():
    """Backward compatible: an older learner's or generator's message (no counters) reads with zeros,
    and observe skips such an interval instead of misreading it."""
    old_learner = b'{"v":1,"step":3,"total_steps":10,"policy_version":3,"updated":5.0}'
    old_generator = b'{"v":1,"generator_id":"g","policy_version":2,"rollouts":4,"updated":5.0}'
    progress, report = LearnerProgress.decode(old_learner), GeneratorStatus.decode(old_generator)
    assert (progress.rollout_wait_seconds, progress.uptime_seconds, progress.prompts_pending) == (0.0, 0.0, None)
    assert (report.busy_seconds, report.prompt_wait_seconds, report.weights_wait_seconds,
            report.uptime_seconds) == (0.0, 0.0, 0.0, 0.0)
    assert learner_wait(progress, progress)[0] is None and generator_idle(report, report) is None
