"""The generator autoscaler, applied by the status pass (spec.generator.autoscale; docs/operator.md).

Every `intervalSeconds`, for a Running job whose autoscale is enabled (not suspended, not held by
Kueue): the learner's progress and the generators' reports the status pass has just read from
the job's KV bucket become a `Sample`; `asyncrlhf.autoscale.observe` differentiates it from the
previous one (kept here, in memory: an operator restart costs one interval) into the policy's
`Signals`, and the job's `Autoscaler` (the same pure policy `asyncrlhf run` uses) decides.

The one owner of the generator count is `spec.generator.replicas`, the scale subresource's
specReplicasPath: a decision patches it (conditionally on the job's resourceVersion, so a
concurrent `kubectl scale` is never overwritten) and the same status pass applies the Deployment
(handlers.converge sees it out of step; the spec change's handler applies it again); `kubectl
scale` writes the same field, and the autoscaler takes a count it did not set as a change
(nothing for `stabilizationSeconds`, then it goes on from there). Under Kueue the count is capped
at what the Workload admitted: more would replace the Workload and requeue the whole job.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Optional

import kopf

from asyncrlhf import api
from asyncrlhf.api import AutoscaleSpec
from asyncrlhf.autoscale import Autoscaler, Decision, Observation, Sample, Signals, observe, propose

from . import plan
from .children import Context
from .kube import KubeError
from .status import Observed, parse_timestamp, timestamp

log = logging.getLogger("asyncrlhf_operator.autoscaling")
EVENT_REASON = "ScaledGenerators"


@dataclass
class JobScaler:
    """One job's autoscaler state between status passes (lost on an operator restart)."""

    scaler: Autoscaler
    sample: Optional[Sample] = None  # the last read with a learner progress in it
    read_at: float = -math.inf  # when the signals were last looked at (Unix time)
    replicas: Optional[int] = None  # spec.generator.replicas then: another value = kubectl scale


@dataclass(frozen=True)
class Check:
    """One look at the signals: the interval's observation and, when it had signals, the decision."""

    observation: Observation
    decision: Optional[Decision] = None
    current: int = 0


def admitted_cap(gate: plan.Gate) -> Optional[int]:
    """The most generators Kueue lets the job run without replacing its Workload (None: no limit)."""
    return gate.generators if gate.managed else None


def capped(spec: AutoscaleSpec, cap: Optional[int]) -> AutoscaleSpec:
    if cap is None or cap >= spec.max_replicas:
        return spec
    return spec.model_copy(update={"max_replicas": max(spec.min_replicas, cap)})


def job_scaler(ctx: Context, uid: str, spec: AutoscaleSpec, status: dict[str, Any], now: float) -> JobScaler:
    """The job's autoscaler; a new one starts its clock at the last decision in the status (kept
    across operator restarts) or the job's start, so start-up is never taken for a shortage."""
    found = ctx.autoscalers.get(uid)
    if found is None:
        last = (status.get("autoscale") or {}).get("lastDecision") or {}
        times = [parse_timestamp(t) for t in (last.get("time", ""), status.get("startTime", ""))]
        start = max((t.timestamp() for t in times if t is not None), default=now)
        found = ctx.autoscalers[uid] = JobScaler(Autoscaler(spec, last_change=start))
    return found


def evaluate(js: JobScaler, spec: api.JobSpec, o: Observed, gate: plan.Gate, now: float) -> Optional[Check]:
    """Look at the signals when an interval has passed (None: not yet). Pure but for `js`."""
    autoscale = spec.generator.autoscale
    if now - js.read_at < autoscale.interval_seconds:
        return None
    js.read_at = now
    current = spec.generator.replicas
    if js.replicas is not None and js.replicas != current:  # set by someone else: a change
        js.scaler.last_change = now
    js.replicas = current
    cap = admitted_cap(gate)
    js.scaler.spec = capped(autoscale, cap)
    sample = Sample(now, o.progress, {r.generator_id: r for r in o.reports})
    ready = (o.generators or {}).get("readyReplicas", 0) or 0
    observation = observe(js.sample, sample, spec, current, ready=ready)
    if sample.learner is not None:  # a read without it (the bus away) makes the next interval longer
        js.sample = sample
    if observation.signals is None:
        return Check(observation, current=current)
    decision = js.scaler.step(observation.signals, now)
    if cap is not None and propose(autoscale, observation.signals).replicas > cap:
        decision = dataclasses.replace(decision, reason=f"{decision.reason} (capped at the {cap} generators "
                                       "Kueue admitted: more would replace the Workload and requeue the job)")
    return Check(observation, decision, current)


def pause(js: JobScaler) -> None:
    """Suspended, held by Kueue, not running: no interval spans that time."""
    js.sample, js.read_at, js.replicas = None, -math.inf, None


def signals_fields(s: Signals) -> dict[str, Any]:
    return api.AutoscaleSignals(
        learner_wait_fraction=round(s.learner_wait_fraction, 3), ready=s.ready,
        generator_idle_fraction=round(s.generator_idle_fraction, 3), prompts_pending=s.prompts_pending,
    ).model_dump(by_alias=True)


def status_fields(check: Check, previous: dict[str, Any], moment: str) -> dict[str, Any]:
    """status.autoscale after a look at the signals (the last decision kept until the next one)."""
    out: dict[str, Any] = dict(previous)
    decision, signals = check.decision, check.observation.signals
    out.update(desired=decision.replicas if decision else check.current, lastCheckTime=moment,
               lastCheck=(decision.reason if decision else check.observation.reason)[:1024])
    if signals is not None:
        out["signals"] = signals_fields(signals)
    if decision is not None and decision.changed:
        out["lastDecision"] = api.AutoscaleDecision(
            time=moment, from_replicas=check.current, to_replicas=decision.replicas, reason=decision.reason[:1024],
            signals=api.AutoscaleSignals.model_validate(out["signals"]),
        ).model_dump(by_alias=True)
    return out


async def write_replicas(ctx: Context, body, replicas: int) -> bool:
    """spec.generator.replicas, if the job is still the version read (else False: next interval)."""
    meta = body["metadata"]
    patch = {"metadata": {"resourceVersion": meta.get("resourceVersion")}, "spec": {"generator": {"replicas": replicas}}}
    try:
        await ctx.kube.merge_patch(api.API_VERSION, api.KIND, meta.get("namespace") or "default", meta["name"], patch)
    except KubeError as err:
        if err.status in (404, 409):
            log.info("the generator count of %s was not changed (%s): trying again next interval",
                     meta["name"], err)
            return False
        raise
    return True


async def autoscale(ctx: Context, body, job: api.AsyncRLHFJob, o: Observed, gate: plan.Gate,
                    status: dict[str, Any]) -> Optional[api.AsyncRLHFJob]:
    """The status pass's autoscaling: `status` (the new .status) gets `autoscale`; returns the job
    with its new generator count when it changed (None otherwise)."""
    uid = body["metadata"].get("uid", "")
    spec = job.spec.generator.autoscale
    if not spec.enabled:
        ctx.autoscalers.pop(uid, None)
        status.pop("autoscale", None)
        return None
    now = o.now.timestamp()
    js = job_scaler(ctx, uid, spec, status, now)
    if status.get("phase") != "Running" or job.spec.suspend or o.hold_reason:
        pause(js)
        return None
    held = js.scaler.last_change
    check = evaluate(js, job.spec, o, gate, now)
    if check is None:
        return None
    decision = check.decision
    if decision is not None and decision.changed:
        if not await write_replicas(ctx, body, decision.replicas):
            js.scaler.last_change, js.read_at = held, -math.inf  # not made: decide again next pass
            return None
        js.replicas = decision.replicas
    status["autoscale"] = status_fields(check, status.get("autoscale") or {}, timestamp(o.now))
    if decision is None or not decision.changed:
        return None
    kopf.info(body, reason=EVENT_REASON, message=f"generators {check.current} → {decision.replicas}: "
              f"{decision.reason}")
    return job.model_copy(update={"spec": job.spec.model_copy(update={
        "generator": job.spec.generator.model_copy(update={"replicas": decision.replicas})})})
