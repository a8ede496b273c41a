"""The generator autoscaler's policy: how many generators a job should have, from the bus's signals.

Asynchrony only pays when generation keeps up with learning: too few generators and the learner
waits for rollouts; too many and they idle (no prompts: the learner releases at most maxStaleness + 1
batches ahead, so extra generators only wait for prompts or for weights). Both are measured on
the bus (telemetry.py exports the same numbers), so the count can follow them:

  * the learner waited more than `targetWaitFraction` of the last interval → generation is the
    bottleneck: scale by (1 − target) / (1 − wait), the count at which the learner would wait
    only the target fraction if generation scaled linearly (at least one more);
  * else the generators idled more than `targetIdleFraction` and at most one step's prompts wait →
    too many: the count whose busy time would fill (1 − targetIdle) of theirs (at least one fewer);
  * never more than can be busy at once: (maxStaleness + 1) batches of prompts in flight, split
    into the generators' fetches;
  * every change at most `maxStep`, within [minReplicas, maxReplicas];
  * no decision while generators are starting (their engines take minutes; deciding again before
    they serve would add more for the same shortage: over-shoot);
  * a scale-down only when every proposal of the last `stabilizationSeconds` agreed on fewer
    (the largest of them is taken, as Kubernetes' HPA does), and no change sooner than that after
    the previous one — so a noisy interval cannot make the count oscillate.

`propose` and `decide` are pure (tables in tests/test_autoscale.py); `Autoscaler` keeps the
history of proposals between decisions. bench/autoscale_sim.py runs them against a simulated job.

The signals come from the job's KV bucket: the learner's progress and each generator's report
carry cumulative seconds (waited, busy, idle) and the process's uptime. `observe(prev, now, ...)`
differentiates two reads (`Sample`s) into one interval's `Signals`; the operator
(asyncrlhf_operator/autoscaling.py) and `asyncrlhf run` both call it. Counters, not fractions, so
a missed read only makes an interval longer; a counter or uptime that went down is a restart, and
that process's interval is skipped (the learner's: the whole interval).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional

from .api import AutoscaleSpec, JobSpec
from .messages import GENERATOR_HEARTBEAT_SECONDS, RETIRED_GENERATORS, GeneratorStatus, LearnerProgress


@dataclass(frozen=True)
class Signals:
    """What the bus says about the last interval."""

    replicas: int  # generators wanted now
    ready: int  # generators serving (engine started)
    learner_wait_fraction: float  # of the interval, the learner waited for rollouts
    generator_idle_fraction: float  # mean over serving generators: idle (no prompts, or waiting for weights)
    prompts_pending: int  # released prompts no generator has taken yet
    prompts_per_step: int
    fetch_size: int  # prompts one generator takes at once
    max_staleness: int


@dataclass(frozen=True)
class Proposal:
    replicas: int
    reason: str


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str
    changed: bool


def useful_limit(s: Signals) -> int:
    """The most generators that can be busy at once: the prompts in flight, in fetches."""
    return (s.max_staleness + 1) * math.ceil(s.prompts_per_step / max(1, s.fetch_size))


def propose(spec: AutoscaleSpec, s: Signals) -> Proposal:
    """The count the last interval's signals ask for, before bounds, steps and stabilisation."""
    n = s.ready
    if s.learner_wait_fraction > spec.target_wait_fraction:
        if n == 0:
            return Proposal(1, "no generator is serving and the learner waits")
        want = math.ceil(n * (1 - spec.target_wait_fraction) / max(1e-6, 1 - s.learner_wait_fraction) - 1e-9)
        limit = useful_limit(s)
        if n >= limit:
            return Proposal(n, f"the learner waits {s.learner_wait_fraction:.0%}, but {n} generators already "
                            f"take every prompt in flight (maxStaleness + 1 batches)")
        return Proposal(min(max(want, n + 1), limit),
                        f"the learner waited {s.learner_wait_fraction:.0%} of the interval "
                        f"(target {spec.target_wait_fraction:.0%})")
    if s.generator_idle_fraction > spec.target_idle_fraction and s.prompts_pending <= s.prompts_per_step and n > 0:
        busy = 1 - s.generator_idle_fraction
        want = math.ceil(n * busy / (1 - spec.target_idle_fraction) - 1e-9)
        return Proposal(max(0, min(want, n - 1)),
                        f"generators idled {s.generator_idle_fraction:.0%} with at most a step's prompts waiting "
                        f"(target {spec.target_idle_fraction:.0%})")
    return Proposal(n, "balanced")


@dataclass(frozen=True)
class Past:
    time: float
    replicas: int  # a proposal's count (bounded)


def bounded(spec: AutoscaleSpec, current: int, wanted: int) -> int:
    step = max(-spec.max_step, min(spec.max_step, wanted - current))
    return max(spec.min_replicas, min(spec.max_replicas, current + step))


def decide(spec: AutoscaleSpec, s: Signals, proposal: Proposal, history: tuple[Past, ...], now: float,
           last_change: float) -> Decision:
    """Apply bounds, the maximum step, the start-up hold and the stabilisation window."""
    current = s.replicas
    if current < spec.min_replicas or current > spec.max_replicas:
        return Decision(bounded(spec, current, current), "outside minReplicas..maxReplicas", True)
    if s.ready < current:
        return Decision(current, f"waiting for {current - s.ready} generators to start", False)
    if now - last_change < spec.stabilization_seconds:
        return Decision(current, "changed less than stabilizationSeconds ago", False)
    wanted = bounded(spec, current, proposal.replicas)
    if wanted < current:  # down only as far as every proposal of the window allows
        window = [p.replicas for p in history if now - p.time <= spec.stabilization_seconds]
        wanted = min(current, max(window + [wanted]))
        if wanted >= current:
            return Decision(current, "a scale-down waits until the whole window agrees", False)
    return Decision(wanted, proposal.reason, wanted != current)


@dataclass
class Autoscaler:
    """One job's autoscaler: the proposals of the window and the time of the last change (start it
    with the job's start: its first generators' start-up would otherwise count as a shortage)."""

    spec: AutoscaleSpec
    history: list[Past] = field(default_factory=list)
    last_change: float = -math.inf

    def step(self, s: Signals, now: float) -> Decision:
        proposal = propose(self.spec, s)
        decision = decide(self.spec, s, proposal, tuple(self.history), now, self.last_change)
        self.history = [p for p in self.history if now - p.time <= self.spec.stabilization_seconds]
        self.history.append(Past(now, bounded(self.spec, s.replicas, proposal.replicas)))
        if decision.changed:
            self.last_change = now
        return decision


# ---------------------------------------------------------------------------------------------
# From two reads of the job's KV bucket to one interval's signals

# a generator that reported this recently is serving (it reports every GENERATOR_HEARTBEAT_SECONDS)
SERVING_SECONDS = 2 * GENERATOR_HEARTBEAT_SECONDS + 5.0


@dataclass(frozen=True)
class Sample:
    """One read of the job's KV bucket: `JobKV.progress()` and `JobKV.reports()` at `time` (the
    reader's time.time())."""

    time: float
    learner: Optional[LearnerProgress]
    reports: Mapping[str, GeneratorStatus] = field(default_factory=dict)


@dataclass(frozen=True)
class Observation:
    """The interval's signals, or None with the reason it cannot be used (no decision then)."""

    signals: Optional[Signals]
    reason: str
    generators_measured: int = 0  # generators whose interval counted towards the idle fraction


def grew(before: float, after: float) -> Optional[float]:
    """How much a cumulative counter grew; None when it went down (its process restarted)."""
    return after - before if after >= before else None


def learner_wait(prev: Optional[LearnerProgress], now: Optional[LearnerProgress]) -> tuple[Optional[float], str]:
    """The fraction of the interval the learner waited for rollouts, or None and why not."""
    if now is None:
        return None, "no learner progress on the bus yet"
    if now.done or now.failed:
        return None, "the learner has finished"
    if prev is None:
        return None, "first read: the next one measures an interval"
    span, waited = grew(prev.uptime_seconds, now.uptime_seconds), grew(prev.rollout_wait_seconds,
                                                                       now.rollout_wait_seconds)
    if span is None or waited is None:
        return None, "the learner restarted during the interval"
    if span <= 0:
        return None, "the learner has not reported since the last read"
    return min(1.0, waited / span), ""


def generator_idle(prev: Optional[GeneratorStatus], now: GeneratorStatus) -> Optional[float]:
    """The fraction of its interval one generator idled (no prompt, or waiting for weights); None
    when it has no interval (new, restarted, or no report since the last read)."""
    if prev is None:
        return None
    span = grew(prev.uptime_seconds, now.uptime_seconds)
    idle = [grew(getattr(prev, f), getattr(now, f)) for f in ("prompt_wait_seconds", "weights_wait_seconds")]
    if span is None or span <= 0 or None in idle or grew(prev.busy_seconds, now.busy_seconds) is None:
        return None
    return min(1.0, sum(idle) / span)


def serving(reports: Mapping[str, GeneratorStatus], now: float) -> dict[str, GeneratorStatus]:
    """The generators that reported lately (a scaled-down one drops out within SERVING_SECONDS)."""
    return {r.generator_id: r for r in reports.values()
            if r.generator_id != RETIRED_GENERATORS and now - r.updated <= SERVING_SECONDS}


def observe(prev: Optional[Sample], now: Sample, spec: JobSpec, replicas: int,
            ready: Optional[int] = None, fetch_size: Optional[int] = None) -> Observation:
    """The signals of the interval between two reads. `replicas`: the generators wanted now;
    `ready`: those the platform says are up (a Deployment's readyReplicas), when it knows;
    `fetch_size`: prompts a generator takes at once (default: a step's, as generators do)."""
    wait, why = learner_wait(prev.learner if prev else None, now.learner)
    if wait is None:
        return Observation(None, why)
    current = serving(now.reports, now.time)
    before = {r.generator_id: r for r in (prev.reports.values() if prev else ())}
    idle = [f for gid, r in current.items() if (f := generator_idle(before.get(gid), r)) is not None]
    up = min(len(current), replicas) if ready is None else min(len(current), replicas, ready)
    pending = now.learner.prompts_pending
    signals = Signals(
        replicas=replicas, ready=up, learner_wait_fraction=wait,
        generator_idle_fraction=sum(idle) / len(idle) if idle else 0.0,  # unmeasured: never a reason for fewer
        # unknown backlog: as if a step's prompts waited (allows a scale-down on idle time alone)
        prompts_pending=spec.learner.prompts_per_step if pending is None else pending,
        prompts_per_step=spec.learner.prompts_per_step, fetch_size=fetch_size or spec.learner.prompts_per_step,
        max_staleness=spec.async_.effective_staleness,
    )
    return Observation(signals, "", len(idle))
