"""The operator's generator autoscaler (asyncrlhf_operator/autoscaling.py).

Unit tables for `evaluate` (interval, Kueue's cap, a count set by `kubectl scale`, the clock a new
autoscaler starts from) and for what goes into `.status.autoscale`; then the real operator against
kmock and a real nats-server (test_operator_kmock's cluster): a thread plays the job — it writes
the learner's progress and one report per generator into the job's KV bucket with counters that
grow at the rates of a starved learner, then of idle generators, and marks the Deployment's pods
ready as the kubelet would — and the Deployment's replicas, the job's spec, `.status.autoscale` and
the ScaledGenerators Events follow the policy's decisions.
"""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import datetime, timezone
from typing import Any

import nats
import pytest

from asyncrlhf import api
from asyncrlhf.autoscale import Autoscaler, Observation, Sample, Signals
from asyncrlhf.bus import JobBus
from asyncrlhf.kv import JobKV
from asyncrlhf.messages import GeneratorStatus, LearnerProgress
from asyncrlhf_operator import plan
from asyncrlhf_operator.autoscaling import Check, JobScaler, evaluate, job_scaler, pause, status_fields
from asyncrlhf_operator.children import Context
from asyncrlhf_operator.settings import OperatorConfig
from asyncrlhf_operator.status import Observed

from test_operator_kmock import (  # noqa: F401  (cluster: the fixture)
    CHILDREN, CR, NS, cluster, create_job, events_of, eventually, job_status, mark_learner, replicas,
    status_passes_for,
)

AUTOSCALE = {"enabled": True, "minReplicas": 1, "maxReplicas": 3, "maxStep": 2, "stabilizationSeconds": 0,
             "intervalSeconds": 5, "targetWaitFraction": 0.1, "targetIdleFraction": 0.3}
SPEC = {"generator": {"replicas": 1, "autoscale": AUTOSCALE}, "learner": {"promptsPerStep": 8},
        "async": {"maxStaleness": 2}}
T0 = 1_000_000.0


def job_spec(replicas: int = 1, **autoscale: Any) -> api.JobSpec:
    raw = {**SPEC, "generator": {"replicas": replicas, "autoscale": {**AUTOSCALE, **autoscale}}}
    return api.JobSpec.model_validate(raw)


def observed(spec: api.JobSpec, t: float, wait: float, ready: int) -> Observed:
    """What a status pass read at `t` from a learner that has waited `wait` of its uptime t - T0."""
    progress = LearnerProgress(step=1, total_steps=100, policy_version=1, uptime_seconds=t - T0,
                               rollout_wait_seconds=wait, prompts_pending=0)
    reports = tuple(GeneratorStatus(generator_id=f"g{i}", policy_version=1, uptime_seconds=t - T0, updated=t)
                    for i in range(ready))
    return Observed(now=datetime.fromtimestamp(t, timezone.utc), spec=spec, progress=progress, reports=reports,
                    generators={"readyReplicas": ready})


def two_reads(js: JobScaler, spec: api.JobSpec, gate=plan.OPEN, ready: int = 1, wait_fraction: float = 0.8):
    assert evaluate(js, spec, observed(spec, T0 + 100, 0.0, ready), gate, T0 + 100).decision is None  # first read
    return evaluate(js, spec, observed(spec, T0 + 110, 10 * wait_fraction, ready), gate, T0 + 110)


def test_a_starved_learner_scales_up_by_at_most_max_step():
    spec = job_spec(1)
    js = JobScaler(Autoscaler(spec.generator.autoscale, last_change=T0))
    check = two_reads(js, spec)
    assert check.observation.signals.learner_wait_fraction == pytest.approx(0.8)
    assert (check.decision.replicas, check.decision.changed) == (3, True)  # 5 wanted, maxStep 2
    assert "learner waited 80%" in check.decision.reason


def test_nothing_is_looked_at_before_the_interval_has_passed():
    spec = job_spec(1)
    js = JobScaler(Autoscaler(spec.generator.autoscale, last_change=T0))
    assert evaluate(js, spec, observed(spec, T0 + 100, 0.0, 1), plan.OPEN, T0 + 100) is not None
    assert evaluate(js, spec, observed(spec, T0 + 104, 4.0, 1), plan.OPEN, T0 + 104) is None  # interval 5 s
    assert evaluate(js, spec, observed(spec, T0 + 105, 4.0, 1), plan.OPEN, T0 + 105) is not None


def test_kueue_caps_the_count_at_what_it_admitted():
    spec = job_spec(2)
    js = JobScaler(Autoscaler(spec.generator.autoscale, last_change=T0))
    admitted = plan.Gate(managed=True, admitted=True, generators=2)
    check = two_reads(js, spec, admitted, ready=2)
    assert (check.decision.replicas, check.decision.changed) == (2, False)
    assert "capped at the 2 generators Kueue admitted" in check.decision.reason
    spec3 = job_spec(1)  # below the cap: up to it, and the reason says why not further
    check = two_reads(JobScaler(Autoscaler(spec3.generator.autoscale, last_change=T0)), spec3,
                      plan.Gate(managed=True, admitted=True, generators=2))
    assert (check.decision.replicas, check.decision.changed) == (2, True) and "capped" in check.decision.reason


def test_a_count_set_by_kubectl_scale_is_kept_for_the_stabilization_window():
    spec = job_spec(1, stabilizationSeconds=60)
    js = JobScaler(Autoscaler(spec.generator.autoscale, last_change=T0), replicas=3)  # it had set 3
    check = two_reads(js, spec)  # the spec says 1 now: someone scaled by hand
    assert check.decision.changed is False and "changed less than stabilizationSeconds ago" in check.decision.reason
    assert js.scaler.last_change == T0 + 100 and js.replicas == 1


def test_a_new_autoscaler_starts_its_clock_at_the_last_decision_or_the_start():
    ctx = Context(OperatorConfig())
    spec = job_spec(1).generator.autoscale
    status = {"startTime": "2026-03-01T12:00:00Z",
              "autoscale": {"lastDecision": {"time": "2026-03-01T12:05:00Z"}}}
    started = datetime(2026, 3, 1, 12, 5, tzinfo=timezone.utc).timestamp()
    assert job_scaler(ctx, "u1", spec, status, T0).scaler.last_change == started
    assert job_scaler(ctx, "u2", spec, {"startTime": "2026-03-01T12:00:00Z"}, T0).scaler.last_change == \
        started - 300
    assert job_scaler(ctx, "u3", spec, {}, T0).scaler.last_change == T0
    assert job_scaler(ctx, "u1", spec, {}, T0) is ctx.autoscalers["u1"]  # kept between passes


def test_a_pause_forgets_the_last_read():
    spec = job_spec(1)
    js = JobScaler(Autoscaler(spec.generator.autoscale, last_change=T0))
    evaluate(js, spec, observed(spec, T0 + 100, 0.0, 1), plan.OPEN, T0 + 100)
    pause(js)  # suspended, or held by Kueue: no interval may span it
    check = evaluate(js, spec, observed(spec, T0 + 200, 80.0, 1), plan.OPEN, T0 + 200)
    assert check.decision is None and "first read" in check.observation.reason


SIGNALS = Signals(replicas=1, ready=1, learner_wait_fraction=0.81234, generator_idle_fraction=0.0,
                  prompts_pending=0, prompts_per_step=8, fetch_size=8, max_staleness=2)


@pytest.mark.parametrize("check, last_check, decided", [
    (Check(Observation(None, "first read: the next one measures an interval"), current=1),
     "first read: the next one measures an interval", False),
    (Check(Observation(SIGNALS, ""), Autoscaler(job_spec().generator.autoscale).step(SIGNALS, T0), 1),
     "the learner waited 81%", True),
])
def test_status_fields(check, last_check, decided):
    before = {"lastDecision": {"time": "earlier", "fromReplicas": 2, "toReplicas": 1, "reason": "idle"}}
    fields = status_fields(check, before, "2026-03-01T12:00:00Z")
    api.AutoscaleStatus.model_validate(fields)
    assert fields["lastCheck"].startswith(last_check) and fields["lastCheckTime"] == "2026-03-01T12:00:00Z"
    if decided:
        assert fields["desired"] == 3 and fields["signals"]["learnerWaitFraction"] == 0.812
        assert fields["lastDecision"] == {"time": "2026-03-01T12:00:00Z", "fromReplicas": 1, "toReplicas": 3,
                                          "reason": fields["lastCheck"], "signals": fields["signals"]}
    else:
        assert fields["desired"] == 1 and fields["lastDecision"] == before["lastDecision"]


# ---------------------------------------------------------------------------------------------
# The real operator


class PlayedJob(threading.Thread):
    """The job's processes and kubelet, played: every 0.2 s the learner's progress and one report per
    generator the Deployment wants, counters growing at `wait` (learner) and `idle` (generators)
    of the time, and the Deployment's pods all ready."""

    def __init__(self, kube, url: str, name: str) -> None:
        super().__init__(daemon=True)
        self.kube, self.url, self.name = kube, url, name
        self.wait, self.idle = 0.0, 0.0
        self.stopping = threading.Event()

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        nc = await nats.connect(self.url)
        try:
            kv = await JobKV.open(nc.jetstream(), JobBus(NS, self.name).bucket)
            waited, idled, start, last = 0.0, {}, time.monotonic(), time.monotonic()
            while not self.stopping.is_set():
                now = time.monotonic()
                waited += self.wait * (now - last)
                count = replicas(self.kube, self.name) or 0
                self.kube.call("PATCH", CHILDREN["Deployment"].format(self.name) + "/status",
                               {"status": {"replicas": count, "readyReplicas": count}})
                await kv.put_progress(LearnerProgress(step=1, total_steps=1000, policy_version=1, prompts_pending=0,
                                                      uptime_seconds=now - start, rollout_wait_seconds=waited))
                for gid in [f"{self.name}-generator-{i}" for i in range(count)]:
                    born, idle = idled.setdefault(gid, [now, 0.0])
                    idled[gid][1] = idle + self.idle * (now - last)
                    await kv.put_report(GeneratorStatus(generator_id=gid, policy_version=1, uptime_seconds=now - born,
                                                        prompt_wait_seconds=idled[gid][1]))
                last = now
                await asyncio.sleep(0.2)
        finally:
            await nc.close()


def decision_to(kube, name: str, count: int):
    return ((job_status(kube, name).get("autoscale") or {}).get("lastDecision") or {}).get("toReplicas") == count


@pytest.mark.slow
def test_autoscaled_generators_follow_the_signals_on_the_bus(cluster):
    kube, url = cluster
    create_job(kube, "scaly", **SPEC)
    eventually(lambda: kube.get(CHILDREN["Job"].format("scaly")) and replicas(kube, "scaly") == 1, what="children")
    mark_learner(kube, "scaly", {"active": 1, "ready": 1})
    job = PlayedJob(kube, url, "scaly")
    job.wait = 0.8  # the learner starved: 1 -> 3 (5 wanted, maxStep 2, maxReplicas 3)
    job.start()
    try:
        eventually(lambda: replicas(kube, "scaly") == 3, timeout=40, what="3 generators")
        up = eventually(lambda: decision_to(kube, "scaly", 3) and job_status(kube, "scaly")["autoscale"],
                        what="the decision in status")
        assert kube.get(f"{CR}/scaly")["spec"]["generator"]["replicas"] == 3  # the one owner of the count
        assert up["lastDecision"]["fromReplicas"] == 1 and "the learner waited" in up["lastDecision"]["reason"]
        assert up["lastDecision"]["signals"]["learnerWaitFraction"] == pytest.approx(0.8, abs=0.1)
        job.wait, job.idle = 0.0, 0.9  # now the generators idle: 3 -> 1 (in one step or two)
        eventually(lambda: replicas(kube, "scaly") == 1, timeout=40, what="1 generator")
        down = eventually(lambda: decision_to(kube, "scaly", 1) and job_status(kube, "scaly")["autoscale"],
                          what="the scale-down in status")
        assert "generators idled" in down["lastDecision"]["reason"] and down["desired"] == 1
        job.wait, job.idle = 0.8, 0.0  # starved again, but suspended: no decision, no look at the signals
        kube.call("PATCH", f"{CR}/scaly", {"spec": {"suspend": True}})
        eventually(lambda: job_status(kube, "scaly").get("phase") == "Suspended", what="Suspended")
        checked = job_status(kube, "scaly")["autoscale"]["lastCheckTime"]
        status_passes_for(kube, "scaly", 2 * AUTOSCALE["intervalSeconds"] + 1)
        assert kube.get(f"{CR}/scaly")["spec"]["generator"]["replicas"] == 1
        assert job_status(kube, "scaly")["autoscale"]["lastCheckTime"] == checked
    finally:
        job.stopping.set()
        job.join(10)
    messages = eventually(lambda: len(m := [e["message"] for e in events_of(kube, "scaly")
                                            if e.get("reason") == "ScaledGenerators"]) >= 2 and m, what="2 events")
    assert messages[0].startswith("generators 1 → 3: the learner waited")
    assert any(m.endswith("→ 1: " + down["lastDecision"]["reason"]) for m in messages)
    kube.call("DELETE", f"{CR}/scaly")
