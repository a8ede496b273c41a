"""`asyncrlhf run` with `spec.generator.autoscale`: the operator's policy applied to local generator
processes.

Every `intervalSeconds` the runner reads the job's KV bucket — the learner's progress and the
generators' reports, the signals the operator reads on a cluster — turns the last two reads into
the interval's signals (`autoscale.observe`) and lets the job's one `Autoscaler` decide (bounds,
maximum step, start-up hold, stabilisation window). A change scales the GeneratorPool: fresh
processes, or the newest ones stopped gracefully. Only the reports of the generators the run wants
now count: a stopped generator's last report, or the one of a generator's earlier attempt, is not a
serving generator.

Every change is one console line, one `"kind": "autoscale"` line in metrics.jsonl (with the
learner's step, so `report.read_metrics` and a resumed learner's truncation handle it as they do
evaluation lines) and an entry of summary.json's `autoscale.decisions`.

On GPUs a generator needs GPUs of its own: the runner places up to maxReplicas generators as far
as the machine's GPUs go (`generator_slots`) and never scales past that (the decision says so).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

from .api import JobSpec
from .autoscale import Autoscaler, Sample, observe
from .local_generators import GeneratorPool
from .messages import GeneratorStatus, LearnerProgress
from .placement import PlacementError, plan

AUTOSCALE_KIND = "autoscale"  # metrics.jsonl lines of the autoscaler's decisions


def generator_slots(spec: JobSpec, machine_gpus: Sequence[str]) -> list[dict[str, str]]:
    """Each generator slot's device variables: the spec's replicas, or with autoscale up to
    maxReplicas as far as the machine's GPUs go (generators on CPUs: maxReplicas). The learner's
    placement is the same in every plan (it is placed first)."""
    auto, replicas = spec.generator.autoscale, spec.generator.replicas
    counts = range(max(auto.max_replicas, replicas), replicas, -1) if auto.enabled else range(0)
    for n in counts:
        wider = spec.model_copy(deep=True)
        wider.generator.replicas = n
        try:
            placement = plan(wider, machine_gpus)
        except PlacementError:
            continue  # fewer GPUs than that many generators need
        return [placement.of("generator", i).env for i in range(n)]
    placement = plan(spec, machine_gpus)
    return [placement.of("generator", i).env for i in range(replicas)]


@dataclass
class LocalAutoscaler:
    """One run's autoscaler loop over its GeneratorPool (see the module docstring)."""

    spec: JobSpec
    pool: GeneratorPool
    run_dir: Path
    limit: int  # most generators the machine can hold at once (generator_slots)
    started: float = field(default_factory=time.time)  # the job's start: its start-up is no shortage

    def __post_init__(self) -> None:
        self.auto = self.spec.generator.autoscale
        self.policy = Autoscaler(self.auto, last_change=self.started)
        self.previous: Optional[Sample] = None
        self.next_at = self.started + self.auto.interval_seconds
        self.decisions: list[dict] = []
        self.intervals = 0
        self.last_reason = "no interval measured yet"

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def step(self, learner: Optional[LearnerProgress], reports: Mapping[str, GeneratorStatus],
             now: Optional[float] = None) -> Optional[dict]:
        """One interval: read, decide, apply. The decision's record when the count changed, else None."""
        now = time.time() if now is None else now
        self.next_at = now + self.auto.interval_seconds
        wanted = self.pool.ids()
        sample = Sample(now, learner, {k: r for k, r in reports.items() if r.generator_id in wanted})
        before, current = self.previous, self.pool.size
        self.previous = sample
        seen = observe(before, sample, self.spec, current, ready=self.pool.running())
        if seen.signals is None:
            self.last_reason = seen.reason
            return None
        self.intervals += 1
        decision = self.policy.step(seen.signals, now)
        target, reason = decision.replicas, decision.reason
        # a stopping generator holds its GPUs until it is gone
        room = max(current, self.limit - (self.pool.stopping() if self.spec.generator.resources.gpus else 0))
        if target > room:
            target, reason = room, f"{reason}; capped at {room}: no GPUs for more generators here (now)"
        self.last_reason = reason
        if not decision.changed or target == current:
            return None
        self.pool.scale_to(target)
        record = {"kind": AUTOSCALE_KIND, "step": learner.step if learner else 0, "time": now,
                  "seconds": round(now - self.started, 1), "from": current, "to": target, "reason": reason,
                  "interval_seconds": round(now - before.time, 1) if before else None,
                  "signals": asdict(seen.signals)}
        self.decisions.append(record)
        with open(self.run_dir / "metrics.jsonl", "a") as out:  # one write: the learner appends too
            out.write(json.dumps(record) + "\n")
        return record

    def summary(self) -> dict:
        return {"min_replicas": self.auto.min_replicas, "max_replicas": self.auto.max_replicas,
                "limit": self.limit, "generators": self.pool.size, "intervals": self.intervals,
                "last_reason": self.last_reason, "decisions": self.decisions}
