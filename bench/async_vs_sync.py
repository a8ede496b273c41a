"""Async versus sync on the same job, measured side by side in one run.

    python bench/async_vs_sync.py [--manifest examples/local-tiny.yaml] [--steps 120] [--staleness 1]

Runs the job in sync mode (generate with the newest weights, then train) and then in async mode
(maxStaleness N), each end to end with its own embedded NATS, generator and learner processes, and
prints training wall-clock to the same number of steps, final reward and the ratio. Training
wall-clock starts when the first batch is complete, so engine start-up (the same in both) is not
counted; total wall-clock is printed too. Report: runs/<job>-compare/{summary.json,reward.png}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from asyncrlhf.local import compare
from asyncrlhf.manifest import load_manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default="examples/local-tiny.yaml")
    parser.add_argument("--steps", type=int, help="override learner.totalSteps")
    parser.add_argument("--staleness", type=int, help="override async.maxStaleness for the async run")
    parser.add_argument("--runs-dir", default="runs")
    args = parser.parse_args()
    job = load_manifest(args.manifest)
    if args.steps:
        job.spec.learner.total_steps = args.steps
    if args.staleness is not None:
        job.spec.async_.max_staleness = args.staleness
    summary = compare(job, Path(args.runs_dir), quiet=True)
    rows = [("mode", "steps", "train s", "total s", "reward first", "reward final", "staleness mean/max")]
    for mode in ("sync", "async"):
        s = summary[mode]
        rows.append((f"{mode} (N={s['max_staleness']})", str(s["steps"]), f"{s['training_seconds']:.1f}",
                     f"{s['wall_clock_seconds']:.1f}", f"{s['initial_reward_mean']:.3f}",
                     f"{s['final_reward_mean']:.3f}", f"{s['staleness_mean']:.2f}/{s['staleness_max']}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(f"speed-up, training wall-clock (sync / async): {summary['speedup_training_wall_clock']:.2f}x")
    print(f"speed-up, total wall-clock incl. start-up:    {summary['speedup_total_wall_clock']:.2f}x")


if __name__ == "__main__":
    main()
