"""The one-pass head as the proxy reward inside the RL loop: deployment-time adaptation with
simulated labellers vs a fixed proxy, judged by the gold reward (an in-process simulation).

Task: P prompts of C classes, L positions, V tokens; a prompt's hidden target is its class's
(T[c(p)]); GOLD reward = the share of positions right. The policy is a table of logits [P, L, V]
(initial = ref, uniform). Proxy features φ(p, y) = Σ_l R[c(p), l, y_l] with R a fixed random
[C, L, V, D] (D = 48 < C·L·V = 128), so no linear head equals the gold reward: optimising a proxy
can go where gold does not (over-optimisation is possible). Both proxies start as the same one-pass head
(`asyncrlhf.onepass.OnePassRewardHead`) learned on N0 labelled pairs of initial-policy samples.
- fixed proxy: that head, frozen; and, as a control, a frozen head given as many labels as the
  adaptive one ends with, all up front (on initial-policy samples);
- adaptive proxy: after every step, for M prompts of the batch the head picks a pair of the K
  samples by the paper's deployment rule (`deployment_pair`: greedy + optimistic), a simulated
  labeller prefers one with probability σ(8 · Δgold), and the head learns from it (M labels a step).
The RL loss is the project's online DPO (`asyncrlhf.losses`), β = 0.1, on proxy scores; the exact
expected gold reward of the policy is recorded every step.

    .venv/bin/python bench/onepass_rl.py          # bench/results/onepass_rl.{json,md}
    .venv/bin/python bench/onepass_rl.py --quick --out /tmp/oprl
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workloads"))

from asyncrlhf.losses import LossBatch, LossParams, Normalizer, get_loss  # noqa: E402
from asyncrlhf.onepass import OnePassRewardHead, sigmoid  # noqa: E402

P, C, L, V, D = 64, 4, 4, 8, 48
B, K = 16, 4
LABEL_SCALE = 8.0


class World:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.cls = torch.arange(P) % C
        self.targets = torch.randint(0, V, (C, L), generator=torch.Generator().manual_seed(7))[self.cls]
        self.features = np.random.default_rng(11).standard_normal((C, L, V, D)) / math.sqrt(L)
        self.logits = torch.zeros(P, L, V, requires_grad=True)

    def gold(self, prompts: torch.Tensor, tokens: torch.Tensor) -> np.ndarray:
        return (tokens == self.targets[prompts]).float().mean(-1).numpy()

    def phi(self, prompts: torch.Tensor, tokens: torch.Tensor) -> np.ndarray:
        p, t = self.cls[prompts].numpy(), tokens.numpy()
        return self.features[p[:, None], np.arange(L)[None], t].sum(1)  # [n, D]

    def expected_gold(self) -> float:
        with torch.no_grad():
            return torch.softmax(self.logits, -1).gather(-1, self.targets[..., None]).mean().item()

    def sample(self, prompts: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            probs = torch.softmax(self.logits[prompts], -1)
        return torch.multinomial(probs.reshape(-1, V), 1, generator=gen).reshape(-1, L)

    def label(self, head: OnePassRewardHead, phi: np.ndarray, gold: np.ndarray, a: int, b: int) -> None:
        """A simulated labeller (Bradley–Terry on the gold reward) compares answers a and b."""
        y = float(self.rng.random() < sigmoid(LABEL_SCALE * (gold[a] - gold[b])))
        head.update(phi[a] - phi[b], y)


def pretrain(world: World, n0: int, gen: torch.Generator, lam: float) -> OnePassRewardHead:
    head = OnePassRewardHead(dim=D, lam=lam)
    for _ in range(n0):
        prompts = torch.randint(0, P, (1,), generator=gen).repeat(2)
        tokens = world.sample(prompts, gen)
        world.label(head, world.phi(prompts, tokens), world.gold(prompts, tokens), 0, 1)
    return head


def run(seed: int, adaptive: bool, args, n0: int) -> dict:
    world, gen = World(seed), torch.Generator().manual_seed(seed)
    head = pretrain(world, n0, gen, args.lam)
    opt = torch.optim.Adam([world.logits], lr=args.lr)
    loss_fn, params = get_loss("online-dpo"), LossParams(beta=args.beta, kl_coef=args.beta)
    ref = torch.log_softmax(world.logits.detach().clone(), -1)
    curve, labels = [world.expected_gold()], n0
    for _ in range(args.steps):
        prompts = torch.randint(0, P, (B,), generator=gen).repeat_interleave(K)
        tokens = world.sample(prompts, gen)
        phi, gold = world.phi(prompts, tokens), world.gold(prompts, tokens)
        scores = torch.tensor(head.score(phi), dtype=torch.float32)
        lp = torch.log_softmax(world.logits[prompts], -1).gather(-1, tokens[..., None]).squeeze(-1)
        ref_lp = ref[prompts].gather(-1, tokens[..., None]).squeeze(-1)
        batch = LossBatch(logprobs=None, old_logprobs=lp.detach(), ref_logprobs=ref_lp,
                          mask=torch.ones_like(ref_lp), scores=scores, group_size=K)
        prepared = loss_fn.prepare(batch, params)
        batch.logprobs = lp
        loss, _ = loss_fn(batch, prepared, params, Normalizer.of(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if adaptive:
            for g in range(args.labels_per_step):
                rows = slice(g * K, (g + 1) * K)
                a, b = head.deployment_pair(phi[rows], args.bonus)
                world.label(head, phi[rows], gold[rows], a, b)
                labels += 1
        curve.append(world.expected_gold())
    return {"curve": [round(x, 5) for x in curve], "labels": labels, "final_gold": curve[-1],
            "peak_gold": max(curve)}


def _ms(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--n0", type=int, default=200, help="labelled pairs before RL (both proxies)")
    ap.add_argument("--labels-per-step", type=int, default=4)
    ap.add_argument("--bonus", type=float, default=1.0)
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.steps = 2, 80
    torch.set_num_threads(1)
    started = time.monotonic()
    budget = args.n0 + args.steps * args.labels_per_step
    arms = (("fixed proxy", False, args.n0), ("fixed proxy, the adaptive one's labels up front", False, budget),
            ("adaptive proxy", True, args.n0))
    rows = {name: [run(s, adaptive, args, n0) for s in range(args.seeds)] for name, adaptive, n0 in arms}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    result = {"command": " ".join(["python", "bench/onepass_rl.py"] + sys.argv[1:]), "commit": commit,
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "runs": rows, "wall_seconds": round(time.monotonic() - started, 1)}
    lines = ["# One-pass head as the RL proxy: adaptive (deployment-time labels) vs fixed", "",
             f"Command: `{result['command']}` (commit {commit}); {args.seeds} seeds, {args.steps} online-DPO steps "
             f"(β {args.beta}, lr {args.lr}), {B} prompts x K={K}; both heads first learn {args.n0} labelled pairs; "
             f"the adaptive one then {args.labels_per_step} a step (deployment rule, ν = {args.bonus}). "
             f"Initial gold reward {rows['fixed proxy'][0]['curve'][0]:.3f}.", "",
             "| proxy | labels | gold at 1/4 | gold at 1/2 | final gold | peak gold |", "|---|---|---|---|---|---|"]
    for name, runs in rows.items():
        q, h = args.steps // 4, args.steps // 2
        lines.append(f"| {name} | {runs[0]['labels']} | {_ms([r['curve'][q] for r in runs])} | "
                     f"{_ms([r['curve'][h] for r in runs])} | {_ms([r['final_gold'] for r in runs])} | "
                     f"{_ms([r['peak_gold'] for r in runs])} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "onepass_rl.json").write_text(json.dumps(result, indent=1))
    (args.out / "onepass_rl.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
