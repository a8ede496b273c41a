"""The end-of-run report: summary.json, metrics.jsonl (written by the learner) and reward plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from . import __version__
from .snapshots import snapshot_summary

EVAL_KIND = "eval"  # metrics.jsonl lines of held-out evaluations carry "kind": "eval" (evaluation.py)


def _read_lines(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The training steps' lines of metrics.jsonl (one per step; lines with a "kind" are not steps:
    evaluations, the local autoscaler's decisions)."""
    return [row for row in _read_lines(run_dir) if "kind" not in row]


def read_evals(run_dir: str | Path) -> list[dict]:
    """The evaluations' lines of metrics.jsonl (spec.eval), in step order."""
    return [row for row in _read_lines(run_dir) if row.get("kind") == EVAL_KIND]


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def summarize(job, run_dir: Path, wall_seconds: float, produced: int, snapshots: int,
              peak_memory_bytes: int, restarts: int) -> dict[str, Any]:
    rows = read_metrics(run_dir)
    window = max(1, min(10, len(rows) // 5)) if rows else 1
    spec = job.spec
    return {
        "job": job.metadata.name,
        "version": __version__,  # of asyncrlhf
        "mode": spec.async_.mode,
        "max_staleness": spec.async_.effective_staleness,
        "loss": spec.algorithm.loss,
        "engine": spec.generator.engine,
        "generators": spec.generator.replicas,
        "steps": rows[-1]["step"] if rows else 0,
        "total_steps": spec.learner.total_steps,
        "wall_clock_seconds": round(wall_seconds, 2),
        "training_seconds": rows[-1]["time"] if rows else 0.0,
        "initial_reward_mean": _mean(rows[:window], "reward_mean"),
        "final_reward_mean": _mean(rows[-window:], "reward_mean"),
        "reward_window_steps": window,
        "staleness_mean": _mean(rows, "staleness_mean"),
        "staleness_max": max((r["staleness_max"] for r in rows), default=0),
        "rollouts_produced": produced,
        "rollouts_consumed": rows[-1]["consumed"] if rows else 0,
        "rollouts_dropped": rows[-1]["dropped"] if rows else 0,
        "rollouts_dead": rows[-1].get("dead", 0) if rows else 0,
        "updates_skipped": int(sum(r.get("skipped_updates", 0) for r in rows)),  # non-finite loss: not applied
        "snapshots_published": snapshots,
        "learner_restarts": restarts,
        "peak_memory_bytes": peak_memory_bytes,
        "peak_memory_gib": round(peak_memory_bytes / (1 << 30), 3),
        **eval_summary(read_evals(run_dir)),
        **snapshot_summary(Path(run_dir) / "volume"),  # asyncrlhf run's volume (a LoRA run's: adapters)
    }


def eval_summary(evals: list[dict]) -> dict[str, Any]:
    """The held-out evaluations' first and last numbers (none when spec.eval is off)."""
    if not evals:
        return {}
    first, last = evals[0], evals[-1]
    return {"initial_eval_step": first["step"], "initial_eval_reward_mean": first["eval_reward_mean"],
            "final_eval_step": last["step"], "final_eval_reward_mean": last["eval_reward_mean"],
            "final_eval_kl": last["eval_kl"]}


def plot_rewards(curves: dict[str, list[dict]], out: Path, title: str,
                 evals: Optional[dict[str, list[dict]]] = None) -> None:
    """Reward against wall-clock, one line per run, and each run's held-out evaluations (`evals`,
    read_evals) as markers in the same colour (headless: Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, rows in curves.items():
        if rows:
            line, = ax.plot([r["time"] for r in rows], _smooth([r["reward_mean"] for r in rows]), label=label)
            if points := (evals or {}).get(label):
                ax.plot([r["time"] for r in points], [r["eval_reward_mean"] for r in points], "o--",
                        color=line.get_color(), label=f"{label}: held-out eval")
    ax.set_xlabel("training wall-clock (s)")
    ax.set_ylabel("mean reward (moving average of 5 steps)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    else:  # no step finished: say so on the plot (an empty legend is a matplotlib warning)
        ax.text(0.5, 0.5, "no training step finished", transform=ax.transAxes, ha="center", va="center")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _smooth(values: list[float], width: int = 5) -> list[float]:
    out = []
    for i in range(len(values)):
        window = values[max(0, i - width + 1) : i + 1]
        out.append(sum(window) / len(window))
    return out


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
