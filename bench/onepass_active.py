"""One-pass reward head in the active and deployment settings, against fair baselines.

Active setting (Li et al. 2025): each round offers C candidate pairs; the learner picks ONE to be
labelled. Labels and seconds to a target held-out accuracy for
- one-pass / active: the pair maximising ‖z‖ in its H⁻¹ norm (`OnePassRewardHead.select`);
- one-pass / random: a random pair of the round;
- one-pass / passive: every pair of the round is labelled (C labels a round) — the label-hungry
  setting, for reference;
- MLE (L-BFGS) / active: warm-started scipy L-BFGS refit of the L2-regularised logistic loss on
  all labels after each label, selection by the same H⁻¹ norm (its own Hessian, Sherman–Morrison);
- online SGD / active: one SGD step per label (lr 1/√t), selection by the same uncertainty.
Seconds are the learners' own CPU seconds (selection + update, time.process_time: steady on a shared
machine) on one BLAS thread; a label costs nothing here.

Features:
- `synthetic`: anisotropic Gaussian φ (eigenvalues decaying as 1/i), a Bradley–Terry gold θ*;
- `tiny-policy`: the built-in tiny policy's last hidden state (`rewards.FeatureModel`, L2-normalised,
  64-d) of sort-digits prompts and candidate answers; gold preference = the sort-digits rule
  (share of positions right), labels Bradley–Terry on the gold reward difference x 8.

Deployment setting: each round has n = 6 candidate answers of one prompt; the head serves the
first answer greedily and the second by the paper's optimistic rule (`deployment_pair`, ν) or, as
ablations, uncertainty only (ν → ∞) or the greedy runner-up (ν = 0); a simulated user labels the
pair by the gold rule. Measured: the gold reward of the served first answer over rounds.

    .venv/bin/python bench/onepass_active.py           # bench/results/onepass_active.{json,md}
    .venv/bin/python bench/onepass_active.py --quick --out /tmp/op
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from scipy.optimize import minimize  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workloads"))

from asyncrlhf.onepass import OnePassRewardHead, sigmoid, sigmoid_prime  # noqa: E402


class LBFGSMLE:
    """Warm-started L-BFGS refit of Σ logloss + λ/2‖θ‖² on all labels (scipy), plus the H⁻¹ of
    its accumulated curvature for active selection (Sherman–Morrison, as the one-pass head)."""

    def __init__(self, dim: int, lam: float) -> None:
        self.lam, self.theta, self.h_inv = lam, np.zeros(dim), np.eye(dim) / lam
        self.z, self.y = [], []

    def _fg(self, theta, z, y):
        m = z @ theta
        f = float(np.sum(np.logaddexp(0.0, m) - y * m) + 0.5 * self.lam * theta @ theta)
        return f, z.T @ (sigmoid(m) - y) + self.lam * theta

    def update(self, z, y) -> None:
        self.z.append(z)
        self.y.append(y)
        zz, yy = np.array(self.z), np.array(self.y)
        self.theta = minimize(self._fg, self.theta, args=(zz, yy), jac=True, method="L-BFGS-B",
                              options={"maxiter": 50, "gtol": 1e-6}).x
        a_z = self.h_inv @ z
        w = sigmoid_prime(float(z @ self.theta))
        self.h_inv -= (w / (1 + w * float(z @ a_z))) * np.outer(a_z, a_z)

    def select(self, cands) -> int:
        return int(np.argmax(np.einsum("nd,nd->n", cands @ self.h_inv, cands)))


class OnlineSGD(LBFGSMLE):
    """One logistic-loss SGD step per label, lr0/√t (the cheapest baseline)."""

    def __init__(self, dim: int, lam: float, lr0: float = 1.0) -> None:
        super().__init__(dim, lam)
        self.lr0, self.t = lr0, 0

    def update(self, z, y) -> None:
        self.t += 1
        grad = (sigmoid(float(z @ self.theta)) - y) * z + self.lam / max(self.t, 1) * self.theta
        self.theta = self.theta - self.lr0 / math.sqrt(self.t) * grad
        a_z = self.h_inv @ z
        w = sigmoid_prime(float(z @ self.theta))
        self.h_inv -= (w / (1 + w * float(z @ a_z))) * np.outer(a_z, a_z)


def synthetic(d: int, n: int, seed: int):
    """Pair differences z (anisotropic) and a gold θ*; returns (sample(k) -> z rows, label(z) -> y)."""
    rng = np.random.default_rng(seed)
    scales = 1.0 / np.sqrt(np.arange(1, d + 1))
    theta = rng.standard_normal(d) / scales
    theta *= 3.0 / np.linalg.norm(theta * scales)  # margin z·θ* has sd 3
    pool = rng.standard_normal((n, d)) * scales
    return pool, theta


_FEATURES = {}


def _feature_model():
    if "fm" not in _FEATURES:
        from asyncrlhf.models import resolve_model
        from asyncrlhf.rewards import FeatureModel

        _FEATURES["fm"] = FeatureModel(resolve_model("builtin:tiny-sort"), device="cpu", micro_batch=64)
    return _FEATURES["fm"]


def sort_answers(n_prompts: int, per_prompt: int, seed: int):
    """Sort-digits prompts with `per_prompt` candidate answers each (some sorted, most shuffled,
    some with a digit changed): their tiny-policy features [n, per, d] and gold rewards [n, per]."""
    from asyncrlhf.tasks import sort_digits_prompt, sort_digits_reward

    rng = random.Random(seed)
    prompts, answers, gold = [], [], []
    for _ in range(n_prompts):
        rec = sort_digits_prompt(rng)
        digits = rec.text.split()[:-1]
        for _ in range(per_prompt):
            d = sorted(digits) if rng.random() < 0.3 else rng.sample(digits, len(digits))
            if rng.random() < 0.3:
                d[rng.randrange(len(d))] = str(rng.randrange(10))
            prompts.append(rec.text)
            answers.append(" ".join(d))
            gold.append(sort_digits_reward(rec.text, answers[-1], rec.answer))
    phi = _feature_model().features(prompts, answers)
    return phi.reshape(n_prompts, per_prompt, -1), np.array(gold).reshape(n_prompts, per_prompt)


def tiny_policy_pairs(n: int, seed: int):
    """Pair differences of the tiny policy's features; gold margin 8 x (reward difference)."""
    phi, gold = sort_answers(n, 2, seed)
    return phi[:, 0] - phi[:, 1], 8.0 * (gold[:, 0] - gold[:, 1])


LEARNERS = {
    "one-pass": lambda d, lam: OnePassRewardHead(dim=d, lam=lam),
    "mle-lbfgs": lambda d, lam: LBFGSMLE(d, lam),
    "online-sgd": lambda d, lam: OnlineSGD(d, lam),
}


def active_run(z, margin, z_test, y_test, learner: str, strategy: str, lam: float, labels: int,
               cands: int, every: int, seed: int) -> list[tuple[int, float, float]]:
    """(labels, learner seconds, held-out accuracy) every `every` labels."""
    rng = np.random.default_rng(seed)
    model = LEARNERS[learner](z.shape[1], lam)
    order = rng.permutation(len(z))
    curve, spent, seen, pos = [(0, 0.0, 0.5)], 0.0, 0, 0
    while seen < labels and pos + cands <= len(order):
        idx = order[pos:pos + cands]
        pos += cands
        started = time.process_time()
        if strategy == "active":
            picks = [idx[model.select(z[idx])]]
        elif strategy == "random":
            picks = [idx[rng.integers(cands)]]
        else:  # passive: every pair of the round
            picks = list(idx)
        for i in picks:
            y = float(rng.random() < sigmoid(margin[i]))
            model.update(z[i], y)
            seen += 1
            if seen % every == 0:
                spent += time.process_time() - started
                curve.append((seen, spent, float(np.mean((z_test @ model.theta > 0) == y_test))))
                started = time.process_time()
        spent += time.process_time() - started
    return curve


def first_reaching(curve, target: float):
    return next(((n, s) for n, s, a in curve if a >= target), (math.inf, math.inf))


def dataset(features: str, n: int, seed: int, dim: int):
    if features == "synthetic":
        pool, theta = synthetic(dim, n + 4000, seed)
        margin = pool @ theta
        return pool[:n], margin[:n], pool[n:], margin[n:] > 0
    z, margin = tiny_policy_pairs(n + 2000, seed)
    keep = margin[n:] != 0  # a tie has no preference to predict
    return z[:n], margin[:n], z[n:][keep], margin[n:][keep] > 0


def active_bench(args) -> list[dict]:
    rows = []
    settings = [("synthetic", args.dim), ("tiny-policy", 64)]
    combos = [("one-pass", "active"), ("one-pass", "random"), ("one-pass", "passive"),
              ("mle-lbfgs", "active"), ("online-sgd", "active")]
    for features, dim in settings:
        for seed in range(args.seeds):
            z, margin, z_test, y_test = dataset(features, args.labels * args.cands, seed, dim)
            for learner, strategy in combos:
                curve = active_run(z, margin, z_test, y_test, learner, strategy, args.lam, args.labels,
                                   args.cands, args.every, seed)
                rows.append({"features": features, "dim": dim, "seed": seed, "learner": learner,
                             "strategy": strategy, "curve": curve, "final_accuracy": curve[-1][2]})
    return rows


DEPLOY_RULES = {"optimistic ν=1": 1.0, "optimistic ν=0.3": 0.3, "greedy runner-up (ν=0)": 0.0,
                "uncertainty only (ν→∞)": 1e6}


def deployment_run(phi, gold, rule: str, lam: float, seed: int, scale: float) -> list[float]:
    """Per round: the gold reward of the served first answer minus the best candidate's (regret)."""
    rng = np.random.default_rng(seed)
    head = OnePassRewardHead(dim=phi.shape[-1], lam=lam)
    regret = []
    for cands, g in zip(phi, gold):
        if rule == "random second":
            first = int(np.argmax(cands @ head.theta))
            second = int(rng.choice([i for i in range(len(cands)) if i != first]))
        else:
            first, second = head.deployment_pair(cands, DEPLOY_RULES[rule])
        regret.append(float(g.max() - g[first]))
        y = float(rng.random() < sigmoid(scale * (g[first] - g[second])))  # the user prefers first w.p. σ(Δ)
        head.update(cands[first] - cands[second], y)
    return regret


def deployment_data(features: str, rounds: int, seed: int, dim: int, per: int = 6):
    if features == "synthetic":
        rng = np.random.default_rng(100 + seed)
        scales = 1.0 / np.sqrt(np.arange(1, dim + 1))
        theta = rng.standard_normal(dim) / scales
        theta *= 1.0 / np.linalg.norm(theta * scales)
        phi = rng.standard_normal((rounds, per, dim)) * scales
        return phi, phi @ theta, 3.0
    phi, gold = sort_answers(rounds, per, seed)
    return phi, gold, 8.0


def deployment_bench(args) -> list[dict]:
    rows = []
    for features, dim in (("synthetic", args.dim), ("tiny-policy", 64)):
        for seed in range(args.seeds):
            phi, gold, scale = deployment_data(features, args.rounds, seed, dim)
            for rule in list(DEPLOY_RULES) + ["random second"]:
                regret = deployment_run(phi, gold, rule, args.lam, seed, scale)
                tail = regret[-len(regret) // 4:]
                rows.append({"features": features, "seed": seed, "rule": rule, "regret_mean": float(np.mean(regret)),
                             "regret_last_quarter": float(np.mean(tail)),
                             "random_pick_regret": float(np.mean(gold.max(1) - gold.mean(1)))})
    return rows


def _ms(xs) -> str:
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return "—"
    return f"{statistics.fmean(xs):.3g} ± {statistics.stdev(xs):.2g}" if len(xs) > 1 else f"{xs[0]:.3g}"


def markdown(result: dict) -> str:
    a = result["settings"]
    out = ["# One-pass reward head: active and deployment settings", "",
           f"Command: `{result['command']}` (commit {result['commit']}); {a['seeds']} seeds; λ = {a['lam']}; "
           f"{a['cands']} candidate pairs a round; budget {a['labels']} labels; BLAS on one thread.", ""]
    for features in ("synthetic", "tiny-policy"):
        rows = [r for r in result["active"] if r["features"] == features]
        targets = result["targets"][features]
        out += [f"## Active setting, {features} features (d = {rows[0]['dim']})", "",
                "| learner / strategy | final accuracy | " + " | ".join(
                    f"labels to {t} | seconds to {t}" for t in targets) + " |",
                "|---|---|" + "---|---|" * len(targets)]
        for learner, strategy in dict.fromkeys((r["learner"], r["strategy"]) for r in rows):
            mine = [r for r in rows if r["learner"] == learner and r["strategy"] == strategy]
            cells = []
            for t in targets:
                hits = [first_reaching(r["curve"], t) for r in mine]
                reached = sum(math.isfinite(n) for n, _ in hits)
                cells.append(f"{_ms([n for n, _ in hits])} ({reached}/{len(hits)}) | {_ms([s for _, s in hits])}")
            out.append(f"| {learner} / {strategy} | {_ms([r['final_accuracy'] for r in mine])} | "
                       + " | ".join(cells) + " |")
        out.append("")
    out += ["## Deployment-time adaptation (one-pass head, 6 candidates a round)", "",
            f"{a['rounds']} rounds; regret = best candidate's gold reward − the served first answer's; "
            "a random pick's regret for scale.", "",
            "| features | second answer | regret, all rounds | regret, last quarter | random pick |", "|---|---|---|---|---|"]
    for features in ("synthetic", "tiny-policy"):
        for rule in list(DEPLOY_RULES) + ["random second"]:
            mine = [r for r in result["deployment"] if r["features"] == features and r["rule"] == rule]
            out.append(f"| {features} | {rule} | {_ms([r['regret_mean'] for r in mine])} | "
                       f"{_ms([r['regret_last_quarter'] for r in mine])} | {_ms([r['random_pick_regret'] for r in mine])} |")
    return "\n".join(out) + "\n"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return ""


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--labels", type=int, default=600)
    ap.add_argument("--cands", type=int, default=20)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=800)
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--synthetic-targets", type=float, nargs="+", default=[0.85, 0.9, 0.93])
    ap.add_argument("--tiny-targets", type=float, nargs="+", default=[0.7, 0.8, 0.85])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.labels, args.rounds, args.cands = 2, 120, 120, 10
    started = time.monotonic()
    result = {"command": " ".join(["python", "bench/onepass_active.py"] + sys.argv[1:]), "commit": _commit(),
              "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"out": str(args.out)},
              "targets": {"synthetic": args.synthetic_targets, "tiny-policy": args.tiny_targets},
              "active": active_bench(args), "deployment": deployment_bench(args)}
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "onepass_active.json").write_text(json.dumps(_finite(result), indent=1))
    (args.out / "onepass_active.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
