"""asyncrlhf against TRL on the same task, side by side in one run.

    python bench/peer_trl.py [--steps 60] [--target 0.7] [--quick] [--only NAME ...]

Task: the local example's (builtin:tiny-sort, a 2-layer Llama built here; sort-digits prompts and
its rule reward; 32 prompts x K=4 samples per step, temperature 0.7, at most 8 new tokens; AdamW,
lr 3e-4 constant, grad-norm clip 1.0; GRPO with eps 0.2 and KL coefficient beta 0.04). Runs, each
in its own process (peak memory = the process tree's RSS, sampled every 0.2 s):
  * trl-grpo: TRL's GRPOTrainer (HF `generate` inside the trainer: TRL's vLLM paths need a GPU or a
    vLLM server, and TRL 1.13 supports vLLM <= 0.28 while the CPU build here is 0.32);
  * asyncrlhf sync (N=0) and async (N=1), vLLM CPU generator on one core, learner on the other;
  * asyncrlhf sync with the HF engine (the same engine kind as TRL: what the design costs);
  * trl-online-dpo (TRL's experimental OnlineDPOTrainer, 2 samples per prompt) vs asyncrlhf
    online-dpo with K=2, where --with-dpo is given;
  * trl-async-grpo (TRL's experimental AsyncGRPOTrainer) only with `--only trl-async-grpo` and a
    `trl vllm-serve` server at $TRL_VLLM_URL: it generates on a vLLM server and sends weights over
    NCCL, so it needs GPUs (scripts/gpu-smoke.sh runs it when a GPU and vLLM's CUDA build are there).
Reports per run: wall-clock to the target reward (reward = the batch's mean score, smoothed over 5
steps; the clock starts when step 1 has ended, so model loading and engine start-up, different in
each, are left out; total wall-clock is printed too), reward at the same number of generated samples
(the last 5 of --steps steps, 128 samples each) and peak memory. The differences the two APIs
leave are printed (DIFFERENCES).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workloads"))

PROMPTS, K, MAX_TOKENS, TEMPERATURE, LR, BETA, EPS, SEED = 32, 4, 8, 0.7, 3e-4, 0.04, 0.2, 0
SMOOTH = 5
DIFFERENCES = [
    "generation: TRL samples with HF `generate` in the trainer's process; asyncrlhf with vLLM's CPU build (or its "
    "HF engine in the *-hf run) in a generator process",
    "GRPO loss normalisation: TRL loss_type='grpo' (per-sequence token mean, then batch mean); asyncrlhf grpo "
    "(docs/algorithms.md); both: group-normalised advantages, token-level clipped ratio, k3 KL to the reference",
    "prompts: the same generator of sort-digits prompts (seed 0); TRL shuffles its dataset, asyncrlhf streams it",
    "TRL tokenises the prompt text itself; asyncrlhf encodes it with the same tokenizer (no chat template)",
    "no-EOS penalty: none in either",
]


def job(loss: str, mode: str, engine: str, steps: int, k: int = K):
    from asyncrlhf.api import AsyncRLHFJob

    return AsyncRLHFJob.model_validate({
        "apiVersion": "asyncrlhf.dev/v1alpha1", "kind": "AsyncRLHFJob", "metadata": {"name": f"peer-{loss}-{mode}"},
        "spec": {
            "model": {"policy": "builtin:tiny-sort"},
            "task": {"prompts": {"source": "builtin", "name": "sort-digits"},
                     "reward": {"kind": "rule", "rule": "sort-digits"}},
            "algorithm": {"loss": loss, "beta": BETA if loss == "grpo" else 0.1, "samplesPerPrompt": k,
                          "clipEpsilon": EPS},
            "async": {"mode": mode, "maxStaleness": 1},
            "generator": {"engine": engine, "sampling": {"temperature": TEMPERATURE, "maxTokens": MAX_TOKENS},
                          "kvCacheGiB": 0.25},
            "learner": {"promptsPerStep": PROMPTS, "totalSteps": steps, "seed": SEED,
                        "optimizer": {"lr": LR, "maxGradNorm": 1.0}},
            "weightSync": {"everySteps": 1, "keepSnapshots": 3},
        }})


def trial_ours(name: str, steps: int, out: Path) -> None:
    from asyncrlhf.local import run_job
    from asyncrlhf.report import read_metrics

    loss, mode, engine, k = {"asyncrlhf-sync": ("grpo", "sync", "vllm", K), "asyncrlhf-async": ("grpo", "async", "vllm", K),
                             "asyncrlhf-sync-hf": ("grpo", "sync", "hf", K),
                             "asyncrlhf-online-dpo": ("online-dpo", "async", "vllm", 2)}[name]
    result = run_job(job(loss, mode, engine, steps, k), out.parent / f"run-{name}", quiet=True)
    rows = [{"step": r["step"], "time": r["time"], "reward": r["reward_mean"]} for r in read_metrics(result.run_dir)]
    out.write_text(json.dumps({"rows": rows, "ok": result.ok}))


def trl_dataset(n: int):
    import random

    from datasets import Dataset

    from asyncrlhf.tasks import sort_digits_prompt

    rng = random.Random(SEED)
    records = [sort_digits_prompt(rng) for _ in range(n)]
    return Dataset.from_list([{"prompt": r.text, "answer": r.answer} for r in records])


def sort_reward(prompts, completions, answer, **_) -> list[float]:
    from asyncrlhf.tasks import sort_digits_reward

    return [sort_digits_reward(p, c, a) for p, c, a in zip(prompts, completions, answer)]


def step_clock(rows: list):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                rows.append({"step": state.global_step, "time": time.monotonic(), "reward": logs["reward"]})
    return Clock()


def trial_trl(name: str, steps: int, out: Path) -> None:
    from asyncrlhf.models import load_tokenizer, resolve_model

    path = resolve_model("builtin:tiny-sort")
    tokenizer = load_tokenizer(path)
    common = dict(output_dir=str(out.parent / name), use_cpu=True, bf16=False, report_to="none", logging_steps=1,
                  save_strategy="no", seed=SEED, max_steps=steps, learning_rate=LR, lr_scheduler_type="constant",
                  max_grad_norm=1.0, optim="adamw_torch", temperature=TEMPERATURE, top_p=1.0,
                  dataloader_num_workers=0, disable_tqdm=True)
    rows: list = []
    if name == "trl-grpo":
        from trl import GRPOConfig, GRPOTrainer

        config = GRPOConfig(**common, per_device_train_batch_size=PROMPTS * K, num_generations=K,
                            max_completion_length=MAX_TOKENS, beta=BETA, epsilon=EPS, loss_type="grpo",
                            gradient_checkpointing=False)
        trainer = GRPOTrainer(model=path, reward_funcs=[sort_reward], args=config,
                              train_dataset=trl_dataset(PROMPTS * steps), processing_class=tokenizer,
                              callbacks=[step_clock(rows)])
    elif name == "trl-async-grpo":  # GPU only: a `trl vllm-serve` server at TRL_VLLM_URL generates (scripts/gpu-smoke.sh)
        from trl.experimental.async_grpo import AsyncGRPOConfig, AsyncGRPOTrainer

        config = AsyncGRPOConfig(output_dir=str(out.parent / name), report_to="none", logging_steps=1,
                                 save_strategy="no", seed=SEED, max_steps=steps, learning_rate=LR,
                                 num_generations=K, max_completion_length=MAX_TOKENS, temperature=TEMPERATURE,
                                 epsilon=EPS, max_staleness=1,
                                 vllm_server_base_url=os.environ.get("TRL_VLLM_URL", "http://localhost:8000"))
        trainer = AsyncGRPOTrainer(model=path, reward_funcs=[sort_reward], args=config,
                                   train_dataset=trl_dataset(PROMPTS * steps), processing_class=tokenizer,
                                   callbacks=[step_clock(rows)])
    else:
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

        config = OnlineDPOConfig(**common, per_device_train_batch_size=PROMPTS, max_new_tokens=MAX_TOKENS, beta=0.1,
                                 gradient_checkpointing=False)
        trainer = OnlineDPOTrainer(model=path, reward_funcs=[sort_reward], args=config,
                                   train_dataset=trl_dataset(PROMPTS * steps), processing_class=tokenizer,
                                   reward_processing_classes=[tokenizer], callbacks=[step_clock(rows)])
    trainer.train()
    start = rows[0]["time"] if rows else 0.0
    rows = [r | {"time": r["time"] - start} for r in rows]  # seconds since step 1 ended, like asyncrlhf's
    out.write_text(json.dumps({"rows": rows, "ok": True}))


TRIALS = {"trl-grpo": trial_trl, "trl-async-grpo": trial_trl, "asyncrlhf-sync": trial_ours, "asyncrlhf-async": trial_ours,
          "asyncrlhf-sync-hf": trial_ours, "trl-online-dpo": trial_trl, "asyncrlhf-online-dpo": trial_ours}


def run_trial(name: str, steps: int, workdir: Path) -> dict:
    """One run in its own process; its rows, wall-clock and peak RSS (process tree)."""
    out = workdir / f"{name}.json"
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, __file__, "--trial", name, "--steps", str(steps), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=open(workdir / f"{name}.log", "wb"))
    peak, me = 0, psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [me] + me.children(recursive=True)))
        except psutil.Error:
            pass
        time.sleep(0.2)
    wall = time.monotonic() - started
    if proc.returncode != 0 or not out.exists():
        tail = (workdir / f"{name}.log").read_text(errors="replace").strip().splitlines()[-3:]
        return {"name": name, "error": f"exit {proc.returncode}: " + " | ".join(tail)[-400:], "wall": wall}
    return {"name": name, "rows": json.loads(out.read_text())["rows"], "wall": wall, "peak": peak}


def smoothed(rows: list[dict]) -> list[float]:
    return [sum(r["reward"] for r in rows[max(0, i - SMOOTH + 1):i + 1]) / len(rows[max(0, i - SMOOTH + 1):i + 1])
            for i in range(len(rows))]


def figures(result: dict, target: float) -> dict:
    rows = result.get("rows") or []
    if not rows:
        return result
    t0 = rows[0]["time"]
    reach = next((r["time"] - t0 for r, s in zip(rows, smoothed(rows)) if s >= target), None)
    tail = rows[-SMOOTH:]
    return result | {"to_target": reach, "final": sum(r["reward"] for r in tail) / len(tail), "steps": rows[-1]["step"],
                     "first": rows[0]["reward"], "train": rows[-1]["time"] - t0}


def table(results: list[dict], target: float) -> list[str]:
    lines = [f"{'run':22} {'steps':>5} {'reward 1st':>10} {'reward end':>10} {'s to ' + str(target):>9} "
             f"{'train s':>8} {'total s':>8} {'peak RSS':>9}"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['name']:22} could not run here: {r['error']}")
            continue
        reach = f"{r['to_target']:.1f}" if r.get("to_target") is not None else "never"
        lines.append(f"{r['name']:22} {r['steps']:>5} {r['first']:>10.3f} {r['final']:>10.3f} {reach:>9} "
                     f"{r['train']:>8.1f} {r['wall']:>8.1f} {r['peak'] / 2**30:>7.2f}Gi")
    return lines


def ratios(by: dict) -> list[str]:
    def ratio(a: str, b: str, key: str) -> str:
        x, y = by.get(a, {}).get(key), by.get(b, {}).get(key)
        if x and y:
            return f"{x / y:.2f}x"
        said = [f"{n} {'did not run' if 'rows' not in by.get(n, {}) else ('never reached it' if v is None else f'{v:.1f} s')}"
                for n, v in ((a, x), (b, y))]
        return "n/a: " + ", ".join(said)
    return [f"TRL GRPO / asyncrlhf async, time to target: {ratio('trl-grpo', 'asyncrlhf-async', 'to_target')} "
            "(target >= 1.5x)",
            f"asyncrlhf sync / TRL GRPO, time to target: {ratio('asyncrlhf-sync', 'trl-grpo', 'to_target')} "
            "(target <= 1.1x)",
            f"asyncrlhf sync (HF engine) / TRL GRPO, time to target: "
            f"{ratio('asyncrlhf-sync-hf', 'trl-grpo', 'to_target')}",
            f"TRL GRPO / asyncrlhf async, training wall-clock for the same samples: "
            f"{ratio('trl-grpo', 'asyncrlhf-async', 'train')}",
            f"TRL GRPO / asyncrlhf sync-hf, training wall-clock: {ratio('trl-grpo', 'asyncrlhf-sync-hf', 'train')}",
            f"TRL GRPO / asyncrlhf sync, training wall-clock: {ratio('trl-grpo', 'asyncrlhf-sync', 'train')}"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--target", type=float, default=0.7)
    parser.add_argument("--quick", action="store_true", help="2 steps, trl-grpo and asyncrlhf-sync-hf only")
    parser.add_argument("--with-dpo", action="store_true", help="also TRL's OnlineDPOTrainer vs asyncrlhf online-dpo")
    parser.add_argument("--only", nargs="*", choices=list(TRIALS))
    parser.add_argument("--trial", choices=list(TRIALS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trial:
        TRIALS[args.trial](args.trial, args.steps, Path(args.out))
        return {}
    steps = 2 if args.quick else args.steps
    names = args.only or (["trl-grpo", "asyncrlhf-sync-hf"] if args.quick else
                          ["trl-grpo", "asyncrlhf-sync", "asyncrlhf-async", "asyncrlhf-sync-hf"]
                          + (["trl-online-dpo", "asyncrlhf-online-dpo"] if args.with_dpo else []))
    with tempfile.TemporaryDirectory(prefix="peer-trl-") as tmp:
        results = [figures(run_trial(n, steps, Path(tmp)), args.target) for n in names]
    print(f"{steps} steps x {PROMPTS * K} samples; load average {os.getloadavg()[0]:.2f}")
    print("\n".join(table(results, args.target)))
    print("\n".join(ratios({r["name"]: r for r in results})))
    print("DIFFERENCES:\n  - " + "\n  - ".join(DIFFERENCES))
    return {"steps": steps, "target": args.target, "runs": results}


if __name__ == "__main__":
    main()
