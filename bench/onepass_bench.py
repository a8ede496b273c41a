"""One-pass reward head vs maximum-likelihood refits: accuracy, time per update, memory.

Synthetic Bradley-Terry data: z ~ N(0, I_d), y ~ Bernoulli(sigmoid(theta* . z)), ||theta*|| = 2
(Bayes accuracy about 0.78). Both learners see the same stream and the same lambda (the one-pass
H_1 = lambda I, the MLE's L2 penalty lambda/2 ||theta||^2); accuracy is measured on a held-out set.
lambda defaults to d/16, i.e. E||z||^2/16: the initial precision must be commensurate with the
curvature one pair adds (sigmoid' ||z||^2 ~ d/4 here). With lambda = 1 at d = 1024 the early
Newton-like steps overshoot and the head sits on the ||theta|| = B boundary for thousands of
steps (docs/algorithms.md has the numbers; `--lam 1` reproduces them). The MLE's "time per update" is what the online MLE protocol costs when one label arrives at
step t: store it and refit on all t pairs (2 warm-started Newton steps). It is measured only at
the measurement points (its model is first fitted to convergence on the t-1 earlier pairs,
untimed), which keeps the default run at about a minute and a half on 2 cores.

Run (from the repository root):
    PYTHONPATH=workloads .venv/bin/python bench/onepass_bench.py
    PYTHONPATH=workloads .venv/bin/python bench/onepass_bench.py --dims 64 --steps 5000 --points 1000 5000
BLAS runs on one thread by default (--threads): timings on a shared machine are steadier.
"""

from __future__ import annotations

import argparse
import os
import sys


def _threads_from_argv() -> str:
    """BLAS reads its thread count at import, so it is set before numpy is imported."""
    if "--threads" in sys.argv:
        return sys.argv[sys.argv.index("--threads") + 1]
    return "1"


for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = _threads_from_argv()

import time  # noqa: E402
import tracemalloc  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from asyncrlhf.onepass import LogisticMLE, OnePassRewardHead, sigmoid  # noqa: E402

TIMING_WINDOW = 200  # one-pass updates averaged before each measurement point
THETA_NORM = 2.0


@dataclass
class Stream:
    theta: np.ndarray
    z: np.ndarray
    y: np.ndarray
    z_test: np.ndarray
    y_test: np.ndarray

    @property
    def bayes_accuracy(self) -> float:
        return float(np.mean((self.z_test @ self.theta > 0) == (self.y_test > 0.5)))


@dataclass
class Point:
    t: int
    acc: float
    seconds_per_update: float


def make_stream(d: int, steps: int, test: int, seed: int) -> Stream:
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal(d)
    theta *= THETA_NORM / np.linalg.norm(theta)
    z, z_test = rng.standard_normal((steps, d)), rng.standard_normal((test, d))
    y = (rng.random(steps) < sigmoid(z @ theta)).astype(float)
    y_test = (rng.random(test) < sigmoid(z_test @ theta)).astype(float)
    return Stream(theta, z, y, z_test, y_test)


# ---------------------------------------------------------------------------------------------
# The two learners


def run_one_pass(s: Stream, points: list[int], lam: float) -> tuple[list[Point], OnePassRewardHead]:
    head, out = OnePassRewardHead(dim=s.z.shape[1], lam=lam), []
    durations = np.empty(len(s.y))
    for t, (z, y) in enumerate(zip(s.z, s.y)):
        start = time.perf_counter()
        head.update(z, y)
        durations[t] = time.perf_counter() - start
        if t + 1 in points:
            window = durations[max(0, t + 1 - TIMING_WINDOW) : t + 1]
            out.append(Point(t + 1, head.accuracy(s.z_test, s.y_test), float(window.mean())))
    return out, head


def run_mle(s: Stream, points: list[int], lam: float) -> list[Point]:
    mle, added, out = LogisticMLE(dim=s.z.shape[1], lam=lam), 0, []
    for t in points:
        while added < t - 1:
            mle.add(s.z[added], s.y[added])
            added += 1
        mle.refit(steps=6)  # converged fit on the t-1 earlier pairs (untimed)
        start = time.perf_counter()
        mle.update(s.z[t - 1], s.y[t - 1])  # the online protocol: store, refit on all t pairs
        out.append(Point(t, mle.accuracy(s.z_test, s.y_test), time.perf_counter() - start))
        added += 1
    return out


def run_lbfgs(s: Stream, points: list[int], lam: float) -> list[Point]:
    """The fairer MLE baseline: a warm-started L-BFGS refit (scipy) per label instead of Newton
    steps with a d x d solve (bench/onepass_active.LBFGSMLE, which also keeps the H^-1 the active
    setting selects with)."""
    from onepass_active import LBFGSMLE

    model, out = LBFGSMLE(s.z.shape[1], lam), []
    for t in points:
        model.z, model.y = list(s.z[: t - 2]), list(s.y[: t - 2])
        model.update(s.z[t - 2], s.y[t - 2])  # fit on the t-1 earlier pairs (untimed)
        start = time.perf_counter()
        model.update(s.z[t - 1], s.y[t - 1])  # the online protocol: store, refit warm-started
        out.append(Point(t, model_accuracy(model.theta, s), time.perf_counter() - start))
    return out


def model_accuracy(theta: np.ndarray, s: Stream) -> float:
    return float(np.mean((s.z_test @ theta > 0) == (s.y_test > 0.5)))


# ---------------------------------------------------------------------------------------------
# Memory (tracemalloc sees numpy's allocations)


def peak_bytes(fn) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def one_pass_memory(s: Stream, lam: float) -> int:
    def work() -> None:
        head = OnePassRewardHead(dim=s.z.shape[1], lam=lam)
        for z, y in zip(s.z[:TIMING_WINDOW], s.y[:TIMING_WINDOW]):
            head.update(z, y)

    return peak_bytes(work)


def mle_memory(s: Stream, t: int, lam: float) -> int:
    def work() -> None:
        mle = LogisticMLE(dim=s.z.shape[1], lam=lam)
        for z, y in zip(s.z[:t], s.y[:t]):
            mle.add(z, y)
        mle.refit(steps=1)

    return peak_bytes(work)


# ---------------------------------------------------------------------------------------------
# Report


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def bench_dim(d: int, steps: int, points: list[int], test: int, seed: int, lam: float) -> list[str]:
    s = make_stream(d, steps, test, seed)
    started = time.perf_counter()
    one_pass, head = run_one_pass(s, points, lam)
    mle = run_mle(s, points, lam)
    lbfgs = run_lbfgs(s, points, lam)
    rows = [
        f"{d:>5} {lam:>6g} {op.t:>7} {op.acc:>13.4f} {ml.acc:>9.4f} {op.acc - ml.acc:>+8.4f} "
        f"{op.seconds_per_update * 1e3:>15.3f} {ml.seconds_per_update * 1e3:>13.1f} "
        f"{lb.acc:>10.4f} {lb.seconds_per_update * 1e3:>15.1f}"
        for op, ml, lb in zip(one_pass, mle, lbfgs)
    ]
    rows.append(
        f"      memory at t={points[-1]}: one-pass peak {mib(one_pass_memory(s, lam))} "
        f"(state {mib(head.h_inv.nbytes + head.theta.nbytes)}, constant in t), "
        f"MLE peak {mib(mle_memory(s, points[-1], lam))} (history {mib(points[-1] * (d + 1) * 8)}, grows with t)"
    )
    rows.append(
        f"      Bayes accuracy {s.bayes_accuracy:.4f}; projections {head.projections}/{steps}; "
        f"{time.perf_counter() - started:.0f} s"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--steps", type=int, default=20_000, help="pairs in the stream")
    parser.add_argument("--points", type=int, nargs="+", default=[1_000, 20_000])
    parser.add_argument("--test", type=int, default=10_000, help="held-out pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lam", type=float, default=None, help="lambda; default d/16")
    parser.add_argument("--threads", type=int, default=1, help="BLAS/torch threads")
    parser.add_argument("--out", type=str, default="", help="also write the table to this Markdown file")
    args = parser.parse_args()
    if max(args.points) > args.steps:
        parser.error("--points must not exceed --steps")
    torch.set_num_threads(args.threads)
    lines = [f"one-pass (OMD, local norm) vs MLE refit; BLAS threads {args.threads}; seed {args.seed}",
             "    d lambda       t  acc one-pass   acc MLE     diff  one-pass ms/upd  MLE ms/upd  acc L-BFGS"
             "  L-BFGS ms/upd"]
    print("\n".join(lines))
    for d in args.dims:
        lam = args.lam if args.lam is not None else d / 16
        for row in bench_dim(d, args.steps, sorted(args.points), args.test, args.seed, lam):
            print(row, flush=True)
            lines.append(row)
    if args.out:
        command = " ".join(["PYTHONPATH=workloads .venv/bin/python bench/onepass_bench.py"] + sys.argv[1:])
        Path(args.out).write_text(f"# One-pass head vs MLE refits (passive stream)\n\nCommand: `{command}`\n\n"
                                  "```\n" + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main()
