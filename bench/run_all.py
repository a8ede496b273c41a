"""Every bench in one command, and one table of their ratios.

    python bench/run_all.py [--quick] [--only NAME ...] [--out bench/results/summary.md]

Runs each bench below as its own process (in order, one at a time: they measure the machine),
reads the ratios it prints, and writes a Markdown table: bench, figure, value, target, the exact
command, the commit it ran at, seconds it took, and the load average when it ended — with the
machine in the header. `--quick` runs each bench's short variant (a few minutes in all; tests/test_bench_quick.py
runs it so the benches never rot) and writes to bench/results/summary-quick.md unless --out says
otherwise. A bench that fails is a row saying so (and a non-zero exit), never a silent gap. With
`--only`, the rows of the other benches already in the summary are kept (one bench rerun, one update).

Adding a bench is one entry in BENCHES: its script, full and quick arguments (None: not run in
that mode), and the printed lines its figures come from (regex with one group: the number).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Figure:
    label: str
    pattern: str  # one group: the number
    target: str = ""


@dataclass(frozen=True)
class Bench:
    name: str
    script: str
    full: list[str] | None = field(default_factory=list)
    quick: list[str] | None = None
    figures: tuple[Figure, ...] = ()
    note: str = ""  # where the full figures are, for benches that print no ratio


RATIO = r"([0-9.]+)x"
BENCHES = [
    Bench("bus", "bus_bench.py", [], ["--quick"], (
        Figure("asyncrlhf / raw nats-py, publishes in flight", rf"both with publishes in flight: {RATIO}", ">= 0.5x"),
        Figure("asyncrlhf in flight / one at a time", rf"in flight / asyncrlhf one at a time: {RATIO}"),
        Figure("rollout group JSON / packed bytes, K=16 x 1024", rf"K=16 x 1024\).*: {RATIO} smaller"),
        Figure("rollout group JSON / packed decode time, K=16 x 1024", rf"K=16 x 1024\).*smaller, {RATIO} faster"))),
    Bench("engine_overhead", "engine_overhead.py", [], ["--quick"], (
        Figure("our Generator / bare vLLM, tokens/s", rf"our Generator / bare vLLM: {RATIO}", ">= 0.9x"),
        Figure("HF engine batched / one prompt at a time", rf"HF engine batched / before: {RATIO}", ">= 3x"))),
    Bench("peer_trl", "peer_trl.py", [], ["--quick"], (
        Figure("TRL GRPO / asyncrlhf async, time to target", rf"asyncrlhf async, time to target: {RATIO}", ">= 1.5x"),
        Figure("asyncrlhf sync / TRL GRPO, time to target", rf"asyncrlhf sync / TRL GRPO, time to target: {RATIO}",
               "<= 1.1x"),
        Figure("asyncrlhf sync (HF engine) / TRL GRPO, time to target", rf"\(HF engine\) / TRL GRPO, time to target: {RATIO}"),
        Figure("TRL GRPO / asyncrlhf async, training wall-clock", rf"same samples: {RATIO}"),
        Figure("TRL GRPO / asyncrlhf sync (HF engine), training wall-clock", rf"sync-hf, training wall-clock: {RATIO}"),
        Figure("TRL GRPO / asyncrlhf sync (vLLM), training wall-clock", rf"asyncrlhf sync, training wall-clock: {RATIO}"))),
    Bench("async_vs_sync", "async_vs_sync.py", ["--steps", "60"], ["--quick"], (
        Figure("sync / async training wall-clock (the example, generation-bound)", rf"example: sync / async {RATIO}"),
        Figure("sync / async training wall-clock (learner-bound)", rf"learner-bound: sync / async {RATIO}"),
        Figure("learner-bound speed-up / ideal overlap", rf"of the ideal overlap: {RATIO}", ">= 0.9x"))),
    Bench("vllm_stats", "vllm_stats_overhead.py", ["--pairs", "40"], None, (
        Figure("vLLM stats on / off, seconds per generate call", rf"median of the pairs' ratios: {RATIO}"),),
        note="bench/results/vllm_stats_overhead.md"),
    Bench("weight_sync", "weight_sync_bench.py", [], None, note="bench/results/weight_sync.md"),
    Bench("scaleout", "scaleout_bench.py", [], None, note="printed table"),
    Bench("onepass", "onepass_bench.py", ["--out", "bench/results/onepass_bench.md"], None,
          note="bench/results/onepass_bench.md"),
    Bench("onepass_active", "onepass_active.py", [], None,
          note="bench/results/onepass_active.md (tests/test_onepass.py runs --quick)"),
    Bench("onepass_rl", "onepass_rl.py", [], None, note="bench/results/onepass_rl.md (tests/test_onepass.py runs --quick)"),
    Bench("tba", "tba_bench.py", [], None, note="bench/results/tba_bench.md (simulation; tests/test_tba_bench.py runs --quick)"),
    Bench("autoscale_sim", "autoscale_sim.py", [], None, note="bench/results/autoscale_sim.md"),
    Bench("operator", "operator_bench.py", ["--out", "bench/results"], None,
          note="bench/results/operator.md (tests/test_operator_bench.py runs --quick)"),
    Bench("staleness_sweep", "staleness_sweep.py", [], None, note="bench/results/staleness_sweep.md (hours)"),
]


def machine() -> str:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    mem = ""
    try:
        kib = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal")))
        mem = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    return f"{platform.node()}: {os.cpu_count()} cores ({cpu}){mem}, Python {platform.python_version()}"


def commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return rev + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_bench(bench: Bench, args: list[str], log_dir: Path) -> list[dict]:
    """Run one bench; one row per figure (or one row for a bench without figures)."""
    command = [sys.executable, f"bench/{bench.script}", *args]
    shown = " ".join(["python", f"bench/{bench.script}", *args])
    started = time.monotonic()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds, load = time.monotonic() - started, os.getloadavg()[0]
    (log_dir / f"{bench.name}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    base = {"bench": bench.name, "command": shown, "commit": commit(), "seconds": seconds, "load": load,
            "ok": proc.returncode == 0}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        return [base | {"figure": "FAILED", "value": f"exit {proc.returncode}: {tail[0][:200]}", "target": ""}]
    if not bench.figures:
        return [base | {"figure": "(no ratio printed)", "value": bench.note, "target": ""}]
    rows = []
    for fig in bench.figures:
        match = re.search(fig.pattern, proc.stdout)
        value = f"{float(match.group(1)):.2f}x" if match else _why_missing(fig, proc.stdout)
        rows.append(base | {"figure": fig.label, "value": value, "target": fig.target})
    return rows


def _why_missing(fig: Figure, stdout: str) -> str:
    """The bench ran but printed no number for this figure: its own words, when it said why."""
    key = fig.pattern.split(":")[0].replace("\\", "")[:30]
    line = next((ln for ln in stdout.splitlines() if key and key in ln), "")
    return line.split(":", 1)[-1].strip()[:120] if line else "not printed"


def render(rows: list[dict], quick: bool) -> str:
    lines = [f"# Bench summary{' (--quick: short variants, figures not meaningful)' if quick else ''}", "",
             f"Machine {machine()}; written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
             "Ratios are measured side by side in one run of each bench; the load average (1 min) is read when "
             "the bench ended (2 cores shared with other work: compare ratios, not absolute figures).", "",
             "| bench | figure | value | target | command | commit | s | load |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        r = r | {"value": str(r["value"]).replace("|", "/")}  # a cell cannot hold the table's separator
        lines.append(f"| {r['bench']} | {r['figure']} | {r['value']} | {r['target']} | `{r['command']}` | "
                     f"{r['commit']} | {r['seconds']:.0f} | {r['load']:.1f} |")
    missing = [b.name for b in BENCHES if b.name not in {r["bench"] for r in rows}
               and (b.quick if quick else b.full) is not None]
    if missing:
        lines += ["", f"Not run for this summary: {', '.join(missing)} (`python bench/run_all.py --only NAME` adds "
                  "a bench's rows and keeps the others)."]
    return "\n".join(lines) + "\n"


def kept_rows(out: Path, rerun: set[str]) -> list[dict]:
    """The rows of an earlier summary for the benches not run this time (`--only` updates a few)."""
    if not out.exists():
        return []
    rows = []
    for line in out.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 8 or cells[0] in ("bench", "---") or cells[0] in rerun:
            continue
        rows.append({"bench": cells[0], "figure": cells[1], "value": cells[2], "target": cells[3],
                     "command": cells[4].strip("`"), "commit": cells[5], "seconds": float(cells[6] or 0),
                     "load": float(cells[7] or 0), "ok": cells[1] != "FAILED"})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="each bench's short variant (benches without one skip)")
    parser.add_argument("--only", nargs="*", choices=[b.name for b in BENCHES])
    parser.add_argument("--out", help="the summary file (default bench/results/summary.md, --quick: summary-quick.md)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else RESULTS / ("summary-quick.md" if args.quick else "summary.md")
    log_dir = (out.parent / "logs") if args.out else ROOT / "runs" / "bench-logs"  # each bench's full output
    log_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for bench in BENCHES:
        bench_args = bench.quick if args.quick else bench.full
        if (args.only and bench.name not in args.only) or bench_args is None:
            continue
        print(f"--- {bench.name}: python bench/{bench.script} {' '.join(bench_args)}", flush=True)
        rows += run_bench(bench, bench_args, log_dir)
        for r in rows[-len(bench.figures) or -1:]:
            print(f"    {r['figure']}: {r['value']} {r['target']}", flush=True)
    if args.only:  # the other benches' rows of the earlier summary stay, in the order of BENCHES
        order = {b.name: i for i, b in enumerate(BENCHES)}
        rows = sorted(kept_rows(out, set(args.only)) + rows, key=lambda r: order.get(r["bench"], len(order)))
    out.write_text(render(rows, args.quick))
    print(f"summary: {out}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
