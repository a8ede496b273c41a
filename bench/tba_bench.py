"""TBA's searchers in miniature: Trajectory Balance + the replay buffer vs async online DPO, with
1 and 3 generators, at equal (simulated) wall-clock; reported as the time to a target reward and
the speed-up over async online DPO with one generator.

This is an in-process SIMULATION, not a run of the system: the policy, the losses
(`asyncrlhf.losses`: the real `tb` and `online-dpo`), the replay buffer (`asyncrlhf.replay`, with
the learner's `replay_sampling`) and the searchers' sync rule (`asyncrlhf.generator.sync_due`) are
the project's code; the clock and the processes are simulated (an event loop), so the result does
not depend on this machine's 2 shared cores.

Task: P prompts, each with a hidden target of L tokens out of V; reward = the share of positions
right (like sort-digits' partial credit). Policy: a small network, logits[p, l] = W · tanh(E[p] +
Q[l]) (shared weights, so learning one prompt moves the others); the reference is the initial
policy. Evaluation is exact: the expected reward of the current policy over all prompts.

Clock: a generator answers a batch (B prompts x S samples) in GEN_SECONDS x S / 4 (generation
cost proportional to the samples); a learner step takes STEP_SECONDS; the learner publishes a new
version after every step. A generator reloads the newest version when it starts a batch if
`sync_due` says so (the default group: every version; a searcher with syncEvery k: every k).
- online DPO (async, the Async RLHF paper's): each step trains on the oldest fresh batch (K = 4
  samples per prompt, best vs worst); it waits when there is none.
- TB + buffer (our learner's TBA mode): each step stores the oldest fresh batch (S samples per
  prompt) in the buffer, then trains on K = 4 per prompt drawn by the buffer's rule (m = 0.95,
  uniform, or softmax(score / τ)); it waits for a fresh batch like the learner does.
With 3 generators, fresh batches arrive 3x as often, so both losses step more often per second;
the question is what the staleness costs each.

    .venv/bin/python bench/tba_bench.py            # bench/results/tba_bench.{json,md,png}, ~1-2 min
    .venv/bin/python bench/tba_bench.py --quick --out /tmp/tba   # the test's variant (seconds)
"""

from __future__ import annotations

import argparse
import copy
import heapq
import json
import math
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workloads"))

from asyncrlhf.generator import sync_due  # noqa: E402
from asyncrlhf.losses import LossBatch, LossParams, Normalizer, get_loss  # noqa: E402
from asyncrlhf.replay import ReplayBuffer, ReplayItem  # noqa: E402

P, L, V, HIDDEN = 64, 4, 8, 32
B, K = 8, 4  # prompts per step, samples trained per prompt
GEN_SECONDS, STEP_SECONDS = 3.0, 1.0  # generation-bound, as in the papers' settings


@dataclass(frozen=True)
class Config:
    name: str
    loss: str
    sync_every: tuple[int, ...]  # one entry per generator
    samples: int = K  # S generated per prompt
    sampling: str = "uniform"
    temperature: float = 1.0


CONFIGS = [
    Config("online-dpo, 1 generator", "online-dpo", (1,)),
    Config("online-dpo, 3 generators", "online-dpo", (1, 1, 1)),
    Config("tb+buffer, 1 searcher", "tb", (1,), samples=6),
    Config("tb+buffer, 3 searchers (sync 1/2/4)", "tb", (1, 2, 4), samples=6),
    Config("tb+buffer, 3 searchers, reward tau=0.1", "tb", (1, 2, 4), samples=6, sampling="reward", temperature=0.1),
]


class Policy(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(P, HIDDEN, generator=g) * 0.5)
        self.pos = torch.nn.Parameter(torch.randn(L, HIDDEN, generator=g) * 0.5)
        self.out = torch.nn.Parameter(torch.randn(HIDDEN, V, generator=g) * 0.1)

    def logprobs(self, prompts: torch.Tensor) -> torch.Tensor:
        """[n, L, V] log-probabilities for prompts [n]."""
        h = torch.tanh(self.emb[prompts][:, None, :] + self.pos[None])
        return torch.log_softmax(h @ self.out, -1)


def token_logprobs(policy: Policy, prompts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return policy.logprobs(prompts).gather(-1, tokens[..., None]).squeeze(-1)  # [n, L]


@dataclass
class Batch:
    prompts: list[int]
    tokens: torch.Tensor  # [B * S, L]
    scores: torch.Tensor  # [B * S]
    version: int


@dataclass
class Sim:
    cfg: Config
    seed: int
    lr: float
    beta: float
    targets: torch.Tensor = field(init=False)
    rng: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = torch.Generator().manual_seed(1000 + self.seed)
        self.targets = torch.randint(0, V, (P, L), generator=torch.Generator().manual_seed(7))  # same task per seed
        self.policy = Policy(self.seed)
        self.ref = copy.deepcopy(self.policy).requires_grad_(False)
        self.versions = {0: copy.deepcopy(self.policy).requires_grad_(False)}
        self.opt = torch.optim.Adam(self.policy.parameters(), lr=self.lr)
        self.buffer = ReplayBuffer(100_000, 0.95, self.cfg.sampling, self.cfg.temperature)
        self.pyrng = random.Random(self.seed)
        self.loss = get_loss(self.cfg.loss)

    def reward(self, prompts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens == self.targets[prompts]).float().mean(-1)

    def expected_reward(self) -> float:
        with torch.no_grad():
            lp = self.policy.logprobs(torch.arange(P))
            return lp.exp().gather(-1, self.targets[..., None]).mean().item()

    def generate(self, version: int) -> Batch:
        prompts = torch.randint(0, P, (B,), generator=self.rng).tolist()
        rows = torch.tensor(prompts).repeat_interleave(self.cfg.samples)
        with torch.no_grad():
            probs = self.versions[version].logprobs(rows).exp()
        tokens = torch.multinomial(probs.reshape(-1, V), 1, generator=self.rng).reshape(-1, L)
        return Batch(prompts, tokens, self.reward(rows, tokens), version)

    def train_rows(self, batch: Batch, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prompt per row, tokens, scores) of the step's training batch, B x K rows."""
        if self.cfg.loss != "tb":
            return torch.tensor(batch.prompts).repeat_interleave(K), batch.tokens, batch.scores
        s = self.cfg.samples
        for i, p in enumerate(batch.prompts):
            for j in range(s):
                row = i * s + j
                self.buffer.add(ReplayItem(p, tuple(batch.tokens[row].tolist()), float(batch.scores[row]),
                                           batch.version))
        # the learner's rule (replay_sampling.sample): each slot keeps this step's prompt with
        # probability m, else replays a stored prompt; K items per prompt by the buffer's rule
        stored = self.buffer.prompts()
        m = self.buffer.recency_probability
        chosen = [p if self.pyrng.random() < m else self.pyrng.choice(stored) for p in batch.prompts]
        drawn = self.buffer.sample(prompt_ids=chosen, k=K, rng=self.pyrng)
        prompts = torch.tensor([it.prompt_id for items in drawn for it in items])
        tokens = torch.tensor([it.tokens for items in drawn for it in items])
        scores = torch.tensor([it.score for items in drawn for it in items])
        return prompts, tokens, scores

    def train(self, batch: Batch, step: int) -> None:
        prompts, tokens, scores = self.train_rows(batch, step)
        with torch.no_grad():
            ref = token_logprobs(self.ref, prompts, tokens)
            old = token_logprobs(self.versions[batch.version], prompts, tokens)
        full = LossBatch(logprobs=None, old_logprobs=old, ref_logprobs=ref, mask=torch.ones_like(ref),
                         scores=scores, group_size=K)
        params = LossParams(beta=self.beta, kl_coef=self.beta)
        prepared = self.loss.prepare(full, params)
        full.logprobs = token_logprobs(self.policy, prompts, tokens)
        loss, _ = self.loss(full, prepared, params, Normalizer.of(full))
        self.opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
        self.opt.step()
        self.buffer.mark_sync()  # a new version is published after every step
        self.versions[step + 1] = copy.deepcopy(self.policy).requires_grad_(False)
        self.versions.pop(step - 64, None)  # nothing this old is still held (at most 4 versions behind)


def simulate(cfg: Config, seed: int, lr: float, beta: float, seconds: float) -> dict:
    """The event loop: generators finish batches, the learner trains on the oldest; the exact
    expected reward after every step, against the simulated clock."""
    sim = Sim(cfg, seed, lr, beta)
    gen_time = GEN_SECONDS * cfg.samples / K
    held = [0] * len(cfg.sync_every)
    events = [(gen_time * (1 + 0.01 * j), j, sim.generate(0)) for j in range(len(held))]  # (done at, who, batch)
    heapq.heapify(events)
    queue: list[Batch] = []
    now, step, learner_free = 0.0, 0, 0.0
    curve = [(0.0, sim.expected_reward())]
    staleness = []
    while now < seconds:
        if queue and learner_free <= now:
            batch = queue.pop(0)
            staleness.append(step - batch.version)
            sim.train(batch, step)
            step += 1
            learner_free = now + STEP_SECONDS
            curve.append((learner_free, sim.expected_reward()))
            continue
        nxt = events[0][0] if events else math.inf
        if queue and learner_free < nxt:
            now = learner_free
            continue
        now, j, batch = heapq.heappop(events)
        queue.append(batch)
        newest = step if learner_free <= now else step - 1  # the version published by now
        newest = max(newest, 0)
        if sync_due(held[j], newest, cfg.sync_every[j]):
            held[j] = newest
        heapq.heappush(events, (now + gen_time, j, sim.generate(held[j])))
    return {"curve": [(round(t, 2), round(r, 5)) for t, r in curve if t <= seconds], "steps": step,
            "staleness_mean": statistics.fmean(staleness) if staleness else 0.0,
            "staleness_max": max(staleness, default=0)}


def time_to(curve: list, target: float) -> float:
    return next((t for t, r in curve if r >= target), math.inf)


def probe_lr(cfg: Config, grid: list[float], beta: float, seconds: float, seeds: list[int], target: float) -> dict:
    """Each loss's lr from a small grid, probed with ONE generator (the baseline's setting)."""
    scores = {}
    for lr in grid:
        runs = [simulate(cfg, s, lr, beta, seconds) for s in seeds]
        times = [time_to(r["curve"], target) for r in runs]
        scores[lr] = {"time_to_target_mean": statistics.fmean(times),
                      "final_mean": statistics.fmean(r["curve"][-1][1] for r in runs)}
    best = min(grid, key=lambda lr: (scores[lr]["time_to_target_mean"], -scores[lr]["final_mean"]))
    return {"best": best, "grid": {str(k): v for k, v in scores.items()}}


def run(args) -> dict:
    seeds = list(range(args.seeds))
    probes = {}
    for loss in ("online-dpo", "tb"):
        base = next(c for c in CONFIGS if c.loss == loss and len(c.sync_every) == 1)
        probes[loss] = probe_lr(base, args.lr_grid, args.beta, args.seconds, seeds[:2], args.target)
    rows = []
    for cfg in CONFIGS:
        lr = probes[cfg.loss]["best"]
        runs = [simulate(cfg, s, lr, args.beta, args.seconds) for s in seeds]
        times = [time_to(r["curve"], args.target) for r in runs]
        finals = [r["curve"][-1][1] for r in runs]
        by_target = {str(t): [time_to(r["curve"], t) for r in runs] for t in args.targets}
        rows.append({"by_target": by_target, "config": cfg.name, "loss": cfg.loss, "generators": len(cfg.sync_every),
                     "sync_every": list(cfg.sync_every), "samples_generated": cfg.samples,
                     "sampling": cfg.sampling, "temperature": cfg.temperature, "lr": lr,
                     "time_to_target": times, "final_reward": finals,
                     "steps": [r["steps"] for r in runs],
                     "staleness_mean": statistics.fmean(r["staleness_mean"] for r in runs),
                     "staleness_max": max(r["staleness_max"] for r in runs),
                     "curve_seed0": runs[0]["curve"]})
    for row in rows:
        own = next(r for r in rows if r["loss"] == row["loss"] and r["generators"] == 1)
        row["speedup_vs_dpo_1"] = {t: _ratios(rows[0]["by_target"][t], row["by_target"][t]) for t in row["by_target"]}
        row["speedup_vs_same_loss_1"] = {t: _ratios(own["by_target"][t], row["by_target"][t]) for t in row["by_target"]}
        row["reached"] = sum(math.isfinite(t) for t in row["time_to_target"])
    return {"command": " ".join(["python", "bench/tba_bench.py"] + sys.argv[1:]), "commit": _commit(),
            "settings": {"prompts": P, "length": L, "vocab": V, "prompts_per_step": B, "k": K,
                         "gen_seconds_per_batch_at_k": GEN_SECONDS, "step_seconds": STEP_SECONDS,
                         "beta": args.beta, "seconds": args.seconds, "target": args.target, "seeds": seeds,
                         "targets": args.targets,
                         "recency_probability": 0.95},
            "lr_probes": probes, "rows": rows}


def _ratios(base: list[float], times: list[float]) -> list[float]:
    """Per seed: baseline seconds / config seconds, where both reached the target."""
    return [b / t for b, t in zip(base, times) if math.isfinite(t) and math.isfinite(b)]


def _finite(x):
    """JSON without Infinity: a target never reached is null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return ""


def _mean_sd(xs: list[float]) -> str:
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return "—"
    return f"{statistics.fmean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# TBA searchers (simulation): time to expected reward {s['target']}", "",
             f"Command: `{result['command']}` (commit {result['commit']}). Simulated clock: a generator answers "
             f"{s['prompts_per_step']} prompts x K={s['k']} in {s['gen_seconds_per_batch_at_k']} s (x S/K for S "
             f"samples), a learner step takes {s['step_seconds']} s; {len(s['seeds'])} seeds; β = {s['beta']}; "
             f"budget {s['seconds']} s. lr per loss from the grid at 1 generator: "
             + ", ".join(f"{k} {v['best']}" for k, v in result["lr_probes"].items()) + ".", "",
             "| config | lr | reached | seconds to target (mean ± sd) | final reward | steps | "
             "staleness mean / max |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['config']} | {r['lr']} | {r['reached']}/{len(r['time_to_target'])} | "
                     f"{_mean_sd(r['time_to_target'])} | {_mean_sd(r['final_reward'])} | "
                     f"{statistics.fmean(r['steps']):.0f} | {r['staleness_mean']:.2f} / {r['staleness_max']} |")
    targets = list(result["rows"][0]["by_target"])
    lines += ["", "Seconds to each expected reward (mean over the seeds that reached it; reached/seeds) and the "
              "speed-ups (per seed, where both reached it) over online-dpo with 1 generator, and over the same "
              "loss with 1 generator:", "",
              "| config | " + " | ".join(f"to {t}" for t in targets) + " |",
              "|---|" + "---|" * len(targets)]
    for r in result["rows"]:
        cells = []
        for t in targets:
            times, ratios, own = r["by_target"][t], r["speedup_vs_dpo_1"][t], r["speedup_vs_same_loss_1"][t]
            reached = sum(math.isfinite(x) for x in times)
            cells.append(f"{_mean_sd(times)} s ({reached}/{len(times)}), x{_mean_sd(ratios)} / x{_mean_sd(own)}")
        lines.append(f"| {r['config']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in result["rows"]:
        t, y = zip(*r["curve_seed0"])
        ax.plot(t, y, label=r["config"])
    ax.axhline(result["settings"]["target"], color="grey", ls=":")
    ax.set_xlabel("simulated seconds")
    ax.set_ylabel("expected reward (exact)")
    ax.set_title("TB + replay buffer vs async online DPO (seed 0)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 seeds, a short budget, a 1-point lr grid")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=900.0)
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument("--beta", type=float, default=0.05)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.4, 0.5, 0.6, 0.7, 0.8])
    ap.add_argument("--lr-grid", type=float, nargs="+", default=[1e-2, 3e-2, 1e-1, 3e-1])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.seconds, args.lr_grid, args.target, args.targets = 2, 150.0, [3e-2], 0.4, [0.3, 0.4]
    torch.set_num_threads(1)
    started = time.monotonic()
    result = run(args)
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tba_bench.json").write_text(json.dumps(_finite(result), indent=1))
    (args.out / "tba_bench.md").write_text(markdown(result))
    plot(result, args.out / "tba_bench.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
