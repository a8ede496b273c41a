"""The reward-KL frontier under staleness (Async RLHF, Noukhovitch et al. 2024, in miniature).

Protocol (docs/algorithms.md § The reward-KL frontier):
  * task: the built-in sort-digits prompts; GOLD reward = the rule (fraction of positions sorted, 0..1),
    used only to evaluate. PROXY reward = a Bradley-Terry linear head on the frozen reference's last
    hidden states (mean over the answer's tokens and the last token's), fitted on gold-labelled pairs
    of the reference's own samples and rescaled to the gold's mean and spread there. Training sees only
    the proxy, so the policy can over-optimise it;
  * staleness: exact lag N. The batch of step i is sampled by the policy of version max(0, i - N) (the
    learner's weights N updates ago), scored by the proxy, and trained on with the real learner
    (`TorchBackend.train_step`: the losses, micro-batches, the off-policy switches of the spec).
    Everything runs in one process: this measures the algorithm, not the system;
  * the same number of episodes (steps x prompts x K) for every N; the same beta for every loss
    (c_KL = beta, AlgorithmSpec); each loss's lr probed on a small grid at N = 0 first;
  * at every checkpoint, on FRESH samples of the current policy (fixed held-out prompts, fixed seeds:
    common random numbers across runs): gold reward, proxy reward, and KL(pi || pi_ref) estimated as
    the mean over samples y ~ pi of sum_t (log pi - log pi_ref) (unbiased on-policy; log-probs at the
    sampling temperature, as the losses use them).

Run (repository root):
    .venv/bin/python bench/frontier.py --grid paper --jobs 2 --resume   # bench/results/frontier.* (~1 h, 2 cores)
    .venv/bin/python bench/frontier.py --quick --out-dir /tmp/f --name frontier_quick   # the test's run
Results: <out-dir>/<name>.json, .md, .png (default bench/results/frontier.*), with the command and commit.
Every finished run is appended to <out-dir>/<name>.partial.jsonl; --resume skips the runs found there
(same protocol), so an interrupted grid continues where it stopped. The runs are independent: --jobs J
runs J at a time, one process each (one torch thread each); a run's numbers do not depend on J.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workloads"))
sys.path.insert(0, str(ROOT / "bench"))

from frontier_task import Task, evaluate, rollout_batch  # noqa: E402

RESULTS = ROOT / "bench" / "results"
BETA = 0.1  # the KL coefficient of every loss (DPO's beta, the KL penalty's c_KL)
LR_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
EDGE_STEPS = 2  # x3 steps the probe may add beyond LR_GRID's edges
# the off-policy switches ablated (docs/algorithms.md § Off-policy switches), on proximal-rloo
SWITCHES = {
    "default": {},
    "learner": {"oldLogprobs": "learner", "importanceCap": 2.0},
    "dualclip": {"dualClip": 3.0},
}


@dataclass(frozen=True)
class Grid:
    """What one invocation runs."""

    losses: tuple[str, ...]
    staleness: tuple[int, ...]
    seeds: tuple[int, ...]
    sizes: tuple[str, ...]
    steps: int
    prompts: int  # per step
    eval_prompts: int
    eval_every: int
    ablation_staleness: tuple[int, ...] = ()  # N at which proximal-rloo runs with each switch
    lr_probe: bool = True
    lrs: dict = field(default_factory=dict)  # loss -> lr, when not probed


GRIDS = {
    "quick": Grid(("online-dpo", "proximal-rloo"), (0, 2), (0, 1), ("tiny",), steps=4, prompts=4,
                  eval_prompts=32, eval_every=2, ablation_staleness=(2,), lr_probe=False,
                  lrs={"online-dpo": 3e-4, "proximal-rloo": 3e-4}),
    "small": Grid(("online-dpo", "proximal-rloo", "ppo"), (0, 4, 16), (0, 1, 2), ("tiny",), steps=48,
                  prompts=16, eval_prompts=256, eval_every=8, ablation_staleness=(16,)),
    # what the issue asks for, at the small grid's budget per run: 4 losses x 7 N x 5 seeds x 2 sizes, the
    # lrs probed per size, both switches at N in {4, 16, 32}: 2 x (20 + 140 + 30) = 380 runs, ~2 CPU-hours
    "paper": Grid(("online-dpo", "rloo", "proximal-rloo", "ppo"), (0, 1, 2, 4, 8, 16, 32), tuple(range(5)),
                  ("tiny", "small"), steps=48, prompts=16, eval_prompts=256, eval_every=8,
                  ablation_staleness=(4, 16, 32)),
    "full": Grid(("online-dpo", "rloo", "proximal-rloo", "ppo"), (0, 1, 2, 4, 8, 16, 32), tuple(range(5)),
                 ("tiny", "small"), steps=256, prompts=32, eval_prompts=512, eval_every=16,
                 ablation_staleness=(4, 16, 32)),
}
K = 4


@dataclass(frozen=True)
class RunSpec:
    loss: str
    n: int
    seed: int
    size: str
    lr: float
    switch: str = "default"

    @property
    def name(self) -> str:
        return f"{self.size}-{self.loss}-n{self.n}-s{self.seed}-lr{self.lr:g}-{self.switch}"

    @classmethod
    def of(cls, row: dict) -> "RunSpec":
        """The run a result row (train's: its RunSpec's fields and the curve) came from."""
        return cls(**{f.name: row[f.name] for f in fields(cls)})


def job_spec(run: RunSpec, grid: Grid):
    from asyncrlhf.api import JobSpec

    return JobSpec.model_validate({
        "algorithm": {"loss": run.loss, "beta": BETA, "samplesPerPrompt": K, **SWITCHES[run.switch]},
        "task": {"reward": {"noEosPenalty": -1.0}},
        "generator": {"sampling": {"temperature": 0.7, "maxTokens": 8}},
        "learner": {"promptsPerStep": grid.prompts, "totalSteps": grid.steps, "microBatchSize": 0,
                    "seed": run.seed, "optimizer": {"lr": run.lr, "maxGradNorm": 1.0}},
    })


def train(run: RunSpec, grid: Grid, task: Task) -> dict:
    """One run: exact lag N, a checkpoint every eval_every steps; the curve of (step, KL, gold, proxy)."""
    from asyncrlhf.backends.torch_backend import TorchBackend
    from asyncrlhf.models import load_causal_lm

    torch.manual_seed(run.seed)
    spec = job_spec(run, grid)
    backend = TorchBackend(spec, task.path, task.path)
    generator = load_causal_lm(task.path).eval()
    versions = {0: _state(backend)}
    curve, train_gold, started = [], [], time.monotonic()
    for step in range(grid.steps + 1):
        if step % grid.eval_every == 0 or step == grid.steps:
            curve.append({"step": step, **evaluate(backend.model, task, grid.eval_prompts)})
        if step == grid.steps:
            break
        version = max(0, step - run.n)
        generator.load_state_dict(versions[version])
        batch, gold = rollout_batch(generator, task, step, run.seed, grid.prompts, K)
        train_gold.append(gold)
        metrics = backend.train_step(batch, step)
        if not all(map(_finite, metrics.values())):
            raise RuntimeError(f"{run.name}: non-finite metrics at step {step}: {metrics}")
        versions[step + 1] = _state(backend)
        versions.pop(step + 1 - run.n - 1, None)  # only the last N+1 versions can still generate
    return {**asdict(run), "curve": curve, "train_gold": train_gold, "seconds": round(time.monotonic() - started, 1)}


def _state(backend) -> dict:
    return {k: v.detach().clone() for k, v in backend.model.state_dict().items()}


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def probe_lrs(grid: Grid, execute, log) -> tuple[dict, list]:
    """Each size's lr per loss: the value with the best final gold reward at N = 0 (seed 0), on LR_GRID
    widened one x3 step at a time (at most EDGE_STEPS) while the best sits at the probed range's edge."""
    if not grid.lr_probe:
        return {size: dict(grid.lrs) for size in grid.sizes}, []
    tried = {(size, loss): list(LR_GRID) for size in grid.sizes for loss in grid.losses}
    for round_ in range(EDGE_STEPS + 1):
        done = execute([RunSpec(loss, 0, 0, size, lr) for (size, loss), lrs in tried.items() for lr in lrs])
        best = {key: max(lrs, key=lambda lr: done[RunSpec(key[1], 0, 0, key[0], lr)]["curve"][-1]["gold"])
                for key, lrs in tried.items()}
        widen = {key: (lr * 3 if lr == max(tried[key]) else lr / 3) for key, lr in best.items()
                 if lr in (min(tried[key]), max(tried[key]))}
        if not widen or round_ == EDGE_STEPS:
            break
        for key, lr in widen.items():
            log(f"probe {key[0]} {key[1]}: best lr {best[key]:g} is at the probed edge, adding {lr:.3g}")
            tried[key] = sorted({*tried[key], float(f"{lr:.3g}")})
    chosen: dict = {}
    for (size, loss), lr in best.items():
        chosen.setdefault(size, {})[loss] = lr
    probes = [done[RunSpec(loss, 0, 0, size, lr)] for (size, loss), lrs in tried.items() for lr in lrs]
    return chosen, probes  # (each probe was logged by the executor as it finished)


def planned_runs(grid: Grid, lrs: dict) -> list[RunSpec]:
    runs = [RunSpec(loss, n, seed, size, lrs[size][loss]) for size in grid.sizes for loss in grid.losses
            for n in grid.staleness for seed in grid.seeds]
    if "proximal-rloo" in grid.losses:
        runs += [RunSpec("proximal-rloo", n, seed, size, lrs[size]["proximal-rloo"], switch)
                 for size in grid.sizes for switch in SWITCHES if switch != "default"
                 for n in grid.ablation_staleness for seed in grid.seeds]
    return runs


_TASKS: dict = {}  # size -> Task, built once per process


def _run(run: RunSpec, grid: Grid) -> dict:
    """One run in this process (a pool worker builds each size's task on first use)."""
    torch.set_num_threads(1)
    if run.size not in _TASKS:
        _TASKS[run.size] = Task.build(run.size)
    return train(run, grid, _TASKS[run.size])


def protocol(grid: Grid) -> dict:
    """What makes two runs of the same RunSpec the same run (what --resume checks)."""
    return {"steps": grid.steps, "prompts": grid.prompts, "eval_prompts": grid.eval_prompts,
            "eval_every": grid.eval_every, "K": K, "beta": BETA}


class Runner:
    """Runs RunSpecs once each, `jobs` processes at a time, appending every finished row to a JSONL file."""

    def __init__(self, grid: Grid, jobs: int, partial: Path, resume: bool, log):
        self.grid, self.jobs, self.partial, self.log = grid, jobs, partial, log
        self.done: dict[RunSpec, dict] = {}
        if resume and partial.exists():
            for number, line in enumerate(partial.read_text().splitlines(), 1):
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill: that run is run again
                    log(f"resume: line {number} of {partial} is not JSON, skipped")
                    continue
                if entry["protocol"] == protocol(grid):
                    self.done[RunSpec.of(entry["row"])] = entry["row"]
            log(f"resume: {len(self.done)} finished runs read from {partial}")
        else:
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text("")

    def __call__(self, runs: list[RunSpec]) -> dict[RunSpec, dict]:
        todo = list(dict.fromkeys(r for r in runs if r not in self.done))
        todo.sort(key=lambda r: r.size == "tiny")  # the larger model's runs first: the pool ends evenly
        if self.jobs <= 1:
            for run in todo:
                self._finished(run, _run(run, self.grid))
        elif todo:
            with ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {pool.submit(_run, run, self.grid): run for run in todo}
                for future in as_completed(futures):
                    self._finished(futures[future], future.result())
        return {run: self.done[run] for run in runs}

    def _finished(self, run: RunSpec, row: dict) -> None:
        self.done[run] = row
        with self.partial.open("a") as f:
            f.write(json.dumps({"protocol": protocol(self.grid), "row": row}) + "\n")
        last = row["curve"][-1]
        self.log(f"{run.name}: gold {last['gold']:.3f} proxy {last['proxy']:.3f} KL {last['kl']:.2f} "
                 f"({row['seconds']:.0f} s)")


def code_state() -> dict:
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return ""

    dirty = git("status", "--porcelain", "--", "workloads/asyncrlhf/losses", "workloads/asyncrlhf/backends",
                "bench/frontier.py", "bench/frontier_task.py", "bench/frontier_report.py")
    return {"commit": git("rev-parse", "HEAD").strip(), "relevant_files_modified": bool(dirty.strip())}


def overridden(grid: Grid, args) -> Grid:
    """The grid with the command line's overrides."""
    for name in ("seeds", "sizes", "losses", "staleness"):
        if getattr(args, name):
            grid = replace(grid, **{name: tuple(getattr(args, name))})
    for name in ("steps", "eval_every"):
        if getattr(args, name):
            grid = replace(grid, **{name: getattr(args, name)})
    if args.lr:
        lrs = {loss: float(lr) for loss, _, lr in (v.partition("=") for v in args.lr)}
        if set(lrs) != set(grid.losses):
            raise SystemExit(f"--lr needs one LOSS=LR for each of {list(grid.losses)}, got {args.lr}")
        grid = replace(grid, lr_probe=False, lrs=lrs)
    return replace(grid, ablation_staleness=()) if args.no_ablation else grid


def positive(text: str) -> int:
    """An argparse type: a whole number >= 1 (steps, checkpoint interval, processes)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", choices=sorted(GRIDS), default="small")
    ap.add_argument("--quick", action="store_true", help="the --grid quick run (the test's)")
    ap.add_argument("--seeds", type=int, nargs="+", help="override the grid's seeds")
    ap.add_argument("--sizes", nargs="+", choices=["tiny", "small"], help="override the grid's model sizes")
    ap.add_argument("--losses", nargs="+", help="override the grid's losses")
    ap.add_argument("--staleness", type=int, nargs="+", help="override the grid's N values")
    ap.add_argument("--steps", type=positive, help="override the grid's steps per run (more episodes per run)")
    ap.add_argument("--eval-every", type=positive, help="override the grid's steps between checkpoints")
    ap.add_argument("--lr", nargs="+", default=[], metavar="LOSS=LR",
                    help="fixed learning rates (no probe), e.g. from a probe on the other size")
    ap.add_argument("--no-ablation", action="store_true", help="skip the off-policy switch runs")
    ap.add_argument("--from-json", metavar="PATH", help="run nothing: render <name>.{json,md,png} again from a "
                    "finished run's JSON (with this code's statistics)")
    ap.add_argument("--jobs", type=positive, default=1, help="runs at a time, one process each (default 1)")
    ap.add_argument("--resume", action="store_true", help="skip the runs already in <out-dir>/<name>.partial.jsonl")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--name", default="frontier", help="basename of <out-dir>/<name>.{json,md,png}")
    args = ap.parse_args(argv)
    if args.from_json:
        from frontier_report import write_report

        report = json.loads(Path(args.from_json).read_text())
        report.pop("summary", None)
        report["rendered_by"] = {"code": code_state(), "command": "python bench/frontier.py --from-json ..."}
        print("\n".join(str(p) for p in write_report(report, Path(args.out_dir), args.name)))
        return 0
    grid = GRIDS["quick" if args.quick else args.grid]
    grid = overridden(grid, args)
    torch.set_num_threads(1)
    started = time.monotonic()
    log = lambda msg: print(f"[{time.monotonic() - started:7.1f}s] {msg}", flush=True)  # noqa: E731
    tasks = {size: Task.build(size) for size in grid.sizes}
    _TASKS.update(tasks)
    for size, task in tasks.items():
        log(f"{size}: proxy pairwise accuracy on held-out pairs {task.proxy_accuracy:.3f} ({task.pairs} pairs)")
    runner = Runner(grid, args.jobs, Path(args.out_dir) / f"{args.name}.partial.jsonl", args.resume, log)
    lrs, probes = probe_lrs(grid, runner, log)
    planned = planned_runs(grid, lrs)
    rows = list(runner(planned).values())  # a probe run is the same run: not run twice
    report = {"command": "python bench/frontier.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "code": code_state(), "grid": asdict(grid), "beta": BETA, "lr_grid": LR_GRID, "lrs": lrs,
              "switches": SWITCHES, "K": K, "tasks": {s: t.describe() for s, t in tasks.items()},
              "lr_probes": probes, "runs": rows, "jobs": args.jobs, "seconds": round(time.monotonic() - started, 1),
              "run_seconds_total": round(sum(r["seconds"] for r in runner.done.values()), 1)}
    from frontier_report import write_report

    paths = write_report(report, Path(args.out_dir), args.name)
    log("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
