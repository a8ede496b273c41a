"""The learner's report files in the run directory: `metrics.jsonl` and `ledger.jsonl`, one line per step
(metrics.jsonl also has one line per held-out evaluation, `"kind": "eval"`: report.read_metrics skips them).

metrics.jsonl is what `asyncrlhf run` plots and summarises; ledger.jsonl says which rollout groups
(id, generator, policy version) each step trained on — an audit trail, never read back by the
learner. A resumed learner first cuts both files back to its checkpoint's step, then writes the
later steps again, so each step appears once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from .api import JobSpec
from .checkpoints import LearnerState
from .messages import LearnerProgress, RolloutGroup

METRICS = "metrics.jsonl"
LEDGER = "ledger.jsonl"


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the lines of steps <= `step` (a resumed learner writes the later ones again)."""
    if not path.exists():
        return
    tmp = path.with_suffix(".tmp")
    with open(path) as src, open(tmp, "w") as dst:
        for line in src:
            if line.strip() and json.loads(line)["step"] <= step:
                dst.write(line if line.endswith("\n") else line + "\n")
    os.replace(tmp, path)


def metrics_row(step: int, groups: list[RolloutGroup], metrics: dict, *, elapsed: float, step_seconds: float,
                consumed: int, dropped: int, dead: int = 0) -> dict:
    """The metrics.jsonl line of step `step` (0-based; written as step + 1: steps done)."""
    scores = [c.score for g in groups for c in g.completions]
    stale = [step - g.policy_version for g in groups]
    return {
        "step": step + 1, "time": round(elapsed, 3),
        "reward_mean": sum(scores) / len(scores),
        "eos_fraction": sum(c.eos for g in groups for c in g.completions) / len(scores),
        "staleness_mean": sum(stale) / len(stale), "staleness_max": max(stale),
        "policy_versions": sorted({g.policy_version for g in groups}),
        "samples": len(scores), "step_seconds": round(step_seconds, 4),
        "consumed": consumed, "dropped": dropped, "dead": dead,
        **{k: round(v, 6) for k, v in metrics.items()},
    }


def progress_report(st: LearnerState, spec: JobSpec, elapsed: float, row: Optional[dict], *, done: bool = False,
                    failed: str = "", signals: Optional[dict] = None) -> LearnerProgress:
    """What the learner reports on the bus (the operator's `.status`, `asyncrlhf run`'s progress line);
    `signals`: the autoscaler's counters (LearnerTelemetry.bus_signals)."""
    samples = st.consumed * spec.algorithm.samples_per_prompt
    return LearnerProgress(
        step=st.step, total_steps=spec.learner.total_steps, policy_version=st.published_version,
        rollouts_consumed=st.consumed, rollouts_dropped=st.dropped, duplicates_skipped=st.duplicates,
        rollouts_dead=st.dead,
        staleness_mean=st.staleness_sum / max(1, st.consumed), staleness_max=st.staleness_max,
        reward_mean=row["reward_mean"] if row else None,
        samples_per_second=samples / elapsed if elapsed > 0 else 0.0,
        last_snapshot=st.last_snapshot, done=done, failed=failed, **(signals or {}),
    )


class RunLog:
    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)
        # tracking.Trackers (spec.tracking): every metrics line also goes to the experiment trackers
        self.trackers = None

    def _append(self, name: str, line: dict, **dump) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / name, "a") as handle:
            handle.write(json.dumps(line, **dump) + "\n")

    def metrics(self, row: dict) -> None:
        """A step's line, or an evaluation's (`"kind": "eval"`, evaluation.py)."""
        self._append(METRICS, row)
        if self.trackers is not None:
            self.trackers.log(row)

    def finish(self) -> None:
        """The run is done: the trackers get its summary."""
        if self.trackers is not None:
            self.trackers.finish()

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()

    def ledger(self, step: int, groups: list[RolloutGroup]) -> None:
        """Which rollout groups step `step` trained on: id, generator, policy version."""
        line = {"step": step + 1, "rollouts": [[g.id, g.generator_id, g.policy_version] for g in groups]}
        self._append(LEDGER, line, separators=(",", ":"))

    def truncate(self, step: int) -> None:
        for name in (METRICS, LEDGER):
            truncate_jsonl(self.dir / name, step)
