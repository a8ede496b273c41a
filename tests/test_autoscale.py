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
