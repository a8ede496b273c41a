"""Async versus sync on the same job, measured side by side in one run, generation- and learner-bound.

    python bench/async_vs_sync.py [--manifest examples/local-tiny.yaml] [--steps 120] [--staleness 1]
                                  [--updates 6] [--only example|learner-bound] [--engine vllm|hf] [--quick]

Runs the job in sync mode (generate with the newest weights, then train) and then in async mode
(maxStaleness N), each end to end with its own embedded NATS, generator and learner processes, and
prints training wall-clock to the same number of steps, final reward and the ratio. Training
wall-clock starts when the first batch is complete, so engine start-up (the same in both) is not
counted; total wall-clock is printed too. Report: runs/<job>-compare/{summary.json,reward.png}.

Two configurations: the example as shipped (generation-bound: the learner's step is short next to
generation) and a learner-bound one, the same job with `algorithm.updatesPerBatch` = --updates
(each batch trained on that many times: the learner's cost grows, generation's does not). For each,
the ideal overlap is computed from the sync run's own timings: the learner's compute per step
T_learn (metrics `step_seconds`) and the rest of a sync step T_rest = sync step time - T_learn
(generation, weight sync, bus); sync costs T_learn + T_rest per step, perfect overlap
max(T_learn, T_rest), so the ideal speed-up is (T_learn + T_rest) / max(T_learn, T_rest). T_rest includes the learner's own
snapshot and checkpoint writes, which cannot overlap with its step: the ideal is an upper bound, and
the async run's own split (T_learn + the rest) is printed to show where the difference goes.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from asyncrlhf.local import compare
from asyncrlhf.manifest import load_manifest
from asyncrlhf.report import read_metrics


def timings(run_dir: Path) -> tuple[float, float]:
    """(T_learn, T_rest) per step of a sync run, the first step (start-up) left out."""
    rows = read_metrics(run_dir)
    steps = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])]
    learn = statistics.fmean(r["step_seconds"] for r in rows[1:]) if len(rows) > 1 else 0.0
    cycle = statistics.fmean(steps) if steps else 0.0
    return learn, max(0.0, cycle - learn)


def run_pair(job, runs_dir: Path) -> dict:
    summary = compare(job, runs_dir, quiet=True)
    learn, rest = timings(runs_dir / f"{job.metadata.name}-sync")
    summary["t_learn"], summary["t_rest"] = learn, rest
    summary["async_t_learn"], summary["async_t_rest"] = timings(runs_dir / f"{job.metadata.name}-async")
    summary["ideal_speedup"] = (learn + rest) / max(learn, rest) if max(learn, rest) > 0 else None
    return summary


def print_pair(title: str, summary: dict) -> None:
    print(f"== {title}")
    rows = [("mode", "steps", "train s", "total s", "reward first", "reward final", "staleness mean/max")]
    for mode in ("sync", "async"):
        s = summary[mode]
        rows.append((f"{mode} (N={s['max_staleness']})", str(s["steps"]), f"{s['training_seconds']:.1f}",
                     f"{s['wall_clock_seconds']:.1f}", f"{s['initial_reward_mean']:.3f}",
                     f"{s['final_reward_mean']:.3f}", f"{s['staleness_mean']:.2f}/{s['staleness_max']}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    speedup = summary["speedup_training_wall_clock"]
    print(f"speed-up, training wall-clock (sync / async): {speedup:.2f}x")
    print(f"speed-up, total wall-clock incl. start-up:    {summary['speedup_total_wall_clock']:.2f}x")
    ideal = summary["ideal_speedup"]
    print(f"sync step: T_learn {summary['t_learn']:.3f} s + T_rest {summary['t_rest']:.3f} s; "
          f"ideal overlap {ideal:.2f}x" if ideal else "ideal overlap: n/a (too few steps)")
    print(f"async step: T_learn {summary['async_t_learn']:.3f} s + the rest {summary['async_t_rest']:.3f} s "
          "(the learner's snapshot, checkpoint and bus work, and any wait for rollouts)")
    if not title.startswith("learner-bound"):
        print(f"example: sync / async {speedup:.2f}x")
    if ideal and title.startswith("learner-bound"):
        print(f"learner-bound: sync / async {speedup:.2f}x")
        print(f"learner-bound speed-up as a fraction of the ideal overlap: {speedup / ideal:.2f}x (target >= 0.9x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default="examples/local-tiny.yaml")
    parser.add_argument("--steps", type=int, help="override learner.totalSteps")
    parser.add_argument("--staleness", type=int, help="override async.maxStaleness for the async run")
    parser.add_argument("--updates", type=int, default=6, help="algorithm.updatesPerBatch of the learner-bound run")
    parser.add_argument("--only", choices=["example", "learner-bound"])
    parser.add_argument("--engine", choices=["vllm", "hf"], help="override generator.engine")
    parser.add_argument("--quick", action="store_true", help="learner-bound only, HF engine, 3 steps")
    parser.add_argument("--runs-dir", default="runs")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.engine, args.only = args.steps or 3, args.engine or "hf", args.only or "learner-bound"
    job = load_manifest(args.manifest)
    if args.steps:
        job.spec.learner.total_steps = args.steps
    if args.staleness is not None:
        job.spec.async_.max_staleness = args.staleness
    if args.engine:
        job.spec.generator.engine = args.engine
    if args.only != "learner-bound":
        print_pair(f"{job.metadata.name} as shipped", run_pair(job, Path(args.runs_dir)))
    if args.only != "example":
        bound = job.model_copy(deep=True)
        bound.metadata.name = f"{job.metadata.name}-learner-bound"
        bound.spec.algorithm.updates_per_batch = args.updates
        print_pair(f"learner-bound (updatesPerBatch {args.updates})", run_pair(bound, Path(args.runs_dir)))


if __name__ == "__main__":
    main()
