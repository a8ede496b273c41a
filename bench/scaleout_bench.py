"""Scale-out overheads, measured in one run: learner samples/s and snapshot publish time for 1 vs 2
learner processes, and generator throughput for 1 vs 2 generator processes, side by side.

Learner: the same rollout batches (sampled once from the tiny policy with the HF engine) trained
by the torch backend in one process and by DeepSpeed ZeRO-2 and ZeRO-3 on 1 and 2 processes
(torchrun running this file; rank 0 drives the backend through distributed.Leader as the Learner
does). Every process gets one thread (one process per core, as one per GPU). `snapshot` is
write_snapshot (gather under ZeRO-3, save_pretrained, sha256, fsync), the time generators wait
for a new policy; `checkpoint` is save_state (optimizer, gathered, safetensors).

Generators: an embedded nats-server, G generator processes (`asyncrlhf generator`, each pinned
to its own core), timed from publishing P prompts to the P-th rollout group, after every
generator has loaded its engine.

Run (from the repository root; about 6 minutes on 2 cores with --engine vllm, most of it vLLM
starting four engines; about 3 with --engine hf):
    .venv/bin/python bench/scaleout_bench.py [--engine vllm|hf] [--steps 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from asyncrlhf.api import AsyncRLHFJob, JobSpec
from asyncrlhf.bus import ROLLOUTS, EmbeddedNats, JobBus, connect, ensure_job_resources, free_port, publish
from asyncrlhf.manifest import dump_manifest
from asyncrlhf.messages import Completion, LearnerProgress, Prompt, RolloutGroup
from asyncrlhf.models import encode_prompt, load_tokenizer, resolve_model
from asyncrlhf.tasks import prompt_stream, rule_reward
from asyncrlhf.workload_env import WorkloadEnv

PROMPTS, K, TOKENS = 16, 4, 16


def bench_spec(backend: str = "torch", stage: int = 2, engine: str = "hf") -> JobSpec:
    return JobSpec.model_validate({
        "algorithm": {"loss": "grpo", "samplesPerPrompt": K},
        "generator": {"engine": engine, "kvCacheGiB": 0.25, "sampling": {"maxTokens": TOKENS}},
        "learner": {"backend": backend, "zeroStage": stage, "promptsPerStep": PROMPTS, "optimizer": {"lr": 1e-4}},
    })


# --- learner -----------------------------------------------------------------------------


def sampled_rollouts(batches: int) -> list[list[RolloutGroup]]:
    """Batches as generators would send them: the tiny policy's samples, scored by the task's rule."""
    from asyncrlhf.engines.hf import HFEngine

    spec, path = bench_spec(), resolve_model("builtin:tiny-sort")
    engine, tokenizer, score = HFEngine(spec, path), load_tokenizer(path), rule_reward(spec.task.reward)
    records = prompt_stream(spec.task.prompts, seed=0)
    out = []
    for b in range(batches):
        recs = [next(records) for _ in range(PROMPTS)]
        ids = [encode_prompt(tokenizer, r.text) for r in recs]
        samples = engine.generate(ids, K, seeds=list(range(b * PROMPTS, (b + 1) * PROMPTS)))
        out.append([
            RolloutGroup(id=f"r{b}-{i}", prompt_id=f"p{b}-{i}", batch=b, index=i, prompt_text=r.text,
                         prompt_token_ids=p, policy_version=0, generator_id="bench", completions=[
                             Completion(text=tokenizer.decode(s.token_ids, skip_special_tokens=True),
                                        token_ids=s.token_ids, logprobs=s.logprobs, eos=s.eos,
                                        score=score(r.text, tokenizer.decode(s.token_ids, skip_special_tokens=True),
                                                    r.answer))
                             for s in group])
            for i, (r, p, group) in enumerate(zip(recs, ids, samples))
        ])
    return out


def time_backend(backend, batches, out: Path, repeats: int = 3) -> dict:
    """samples/s over the timed steps (the first step warms up), snapshot and checkpoint seconds."""
    from asyncrlhf.snapshots import write_snapshot
    from asyncrlhf.backends import to_batch

    tensors = [to_batch(groups, backend.pad_id) for groups in batches]
    backend.train_step(tensors[0], 0)
    started = time.perf_counter()
    for step, batch in enumerate(tensors[1:], start=1):
        backend.train_step(batch, step)
    elapsed = time.perf_counter() - started
    snapshot, checkpoint = [], []
    for v in range(repeats):
        t = time.perf_counter()
        write_snapshot(out, v, backend.save_weights)
        snapshot.append(time.perf_counter() - t)
        directory = out / f"checkpoint-{v}"
        directory.mkdir(parents=True)
        t = time.perf_counter()
        backend.save_state(directory)
        checkpoint.append(time.perf_counter() - t)
    steps = len(tensors) - 1
    return {"samples_per_second": steps * PROMPTS * K / elapsed, "step_seconds": elapsed / steps,
            "snapshot_seconds": sorted(snapshot)[repeats // 2], "checkpoint_seconds": sorted(checkpoint)[repeats // 2]}


def learner_worker(out: Path, stages: list[int]) -> None:
    """Under torchrun: rank 0 times each ZeRO stage through Leader, the other ranks follow."""
    from asyncrlhf.backends import follower_main, make_backend, release_followers

    torch.set_num_threads(1)
    batches = [[RolloutGroup.model_validate(g) for g in b] for b in json.loads((out / "rollouts.json").read_text())]
    path = resolve_model("builtin:tiny-sort")
    for stage in stages:
        spec = bench_spec("deepspeed", stage)
        if int(os.environ.get("RANK", 0)) > 0:
            follower_main(spec)
            continue
        backend = make_backend(spec, path, path)
        try:
            result = time_backend(backend, batches, out / f"zero{stage}-w{os.environ['WORLD_SIZE']}")
        finally:
            release_followers()
        (out / f"zero{stage}-w{os.environ['WORLD_SIZE']}.json").write_text(json.dumps(result))


def learner_table(steps: int, work: Path) -> list[dict]:
    from asyncrlhf.backends.torch_backend import TorchBackend

    batches = sampled_rollouts(steps + 1)
    (work / "rollouts.json").write_text(json.dumps([[g.model_dump() for g in b] for b in batches]))
    torch.set_num_threads(1)
    path = resolve_model("builtin:tiny-sort")
    rows = [{"backend": "torch", "processes": 1,
             **time_backend(TorchBackend(bench_spec(), path, path), batches, work / "torch")}]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for world in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(world),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__, "--learner-worker",
               str(work), "2", "3"]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=open(work / f"w{world}.log", "w"))
        for stage in (2, 3):
            result = json.loads((work / f"zero{stage}-w{world}.json").read_text())
            rows.append({"backend": f"deepspeed ZeRO-{stage}", "processes": world, **result})
    return rows


# --- generators --------------------------------------------------------------------------


def generator_job(name: str, engine: str) -> AsyncRLHFJob:
    return AsyncRLHFJob.model_validate({"apiVersion": "asyncrlhf.dev/v1alpha1", "kind": "AsyncRLHFJob",
                                        "metadata": {"name": name},
                                        "spec": bench_spec(engine=engine).model_dump(by_alias=True)})


async def generator_round(count: int, engine: str, work: Path, url: str) -> dict:
    job = generator_job(f"gens-{count}", engine)
    bus = JobBus(job.metadata.namespace, job.metadata.name)
    config = work / f"{job.metadata.name}.yaml"
    config.write_text(dump_manifest(job))
    nc = await connect(url)
    js = nc.jetstream()
    await ensure_job_resources(js, bus, job.spec.nats.max_bytes, job.spec.nats.ack_wait_seconds)
    kv = await js.key_value(bus.bucket)
    cores = sorted(os.sched_getaffinity(0))
    procs = [spawn_generator(config, url, f"g{i}", cores[i % len(cores)], work) for i in range(count)]
    try:
        while len([k for k in await _keys(kv) if k.startswith("generator.")]) < count:  # engines loaded
            await asyncio.sleep(0.5)
        done, tokens = asyncio.Event(), []

        async def arrived(msg):
            tokens.append(sum(len(c.token_ids) for c in RolloutGroup.decode(msg.data).completions))
            if len(tokens) == 4 * PROMPTS:
                done.set()

        await nc.subscribe(bus.subject(ROLLOUTS), cb=arrived)
        records = prompt_stream(job.spec.task.prompts, seed=1)
        started = time.perf_counter()
        for i in range(4 * PROMPTS):
            rec = next(records)
            msg = Prompt(id=f"{job.metadata.name}-{i}", batch=i // PROMPTS, index=i % PROMPTS, text=rec.text,
                         answer=rec.answer, samples=K, min_version=0)
            await publish(js, bus.subject("prompts"), msg.encode(), msg_id=msg.id)
        await asyncio.wait_for(done.wait(), 600)
        elapsed = time.perf_counter() - started
        await kv.put("learner", LearnerProgress(step=0, total_steps=0, policy_version=0, done=True).encode())
    finally:
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        await nc.close()
    return {"generators": count, "rollouts_per_second": 4 * PROMPTS / elapsed,
            "tokens_per_second": sum(tokens) / elapsed, "seconds": elapsed}


async def _keys(kv) -> list[str]:
    import nats

    try:
        return await kv.keys()
    except nats.js.errors.NoKeysError:
        return []


def spawn_generator(config: Path, url: str, name: str, core: int, work: Path) -> subprocess.Popen:
    env = dict(os.environ, **WorkloadEnv(nats_url=url, generator_id=name).variables(), OMP_NUM_THREADS="1",
               VLLM_CPU_OMP_THREADS_BIND=str(core))
    return subprocess.Popen([sys.executable, "-m", "asyncrlhf.cli", "generator", "--config", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(work / f"{config.stem}-{name}.log", "w"),
                            preexec_fn=lambda: os.sched_setaffinity(0, [core]))


def generator_table(engine: str, work: Path) -> list[dict]:
    server = EmbeddedNats().start()
    try:
        return [asyncio.run(generator_round(count, engine, work, server.url)) for count in (1, 2)]
    finally:
        server.close()


# --- report ------------------------------------------------------------------------------


def print_tables(learner: list[dict], generators: list[dict], engine: str) -> None:
    print(f"learner: tiny-sort policy, grpo, {PROMPTS} prompts x {K} samples per step, 1 thread per process")
    print(f"{'backend':18} {'processes':>9} {'samples/s':>10} {'step s':>8} {'snapshot s':>11} {'checkpoint s':>13}")
    for r in learner:
        print(f"{r['backend']:18} {r['processes']:>9} {r['samples_per_second']:>10.1f} {r['step_seconds']:>8.3f} "
              f"{r['snapshot_seconds']:>11.3f} {r['checkpoint_seconds']:>13.3f}")
    print(f"\ngenerators: engine {engine}, {4 * PROMPTS} prompts x {K} samples, up to {TOKENS} tokens, 1 core each")
    print(f"{'generators':>10} {'rollouts/s':>11} {'tokens/s':>9} {'seconds':>8}")
    for r in generators:
        print(f"{r['generators']:>10} {r['rollouts_per_second']:>11.2f} {r['tokens_per_second']:>9.1f} {r['seconds']:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["vllm", "hf"], default="vllm", help="generator engine")
    parser.add_argument("--steps", type=int, default=6, help="timed learner steps (after one warm-up step)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--learner-worker", nargs="+", help=argparse.SUPPRESS)  # OUT STAGE... (under torchrun)
    args = parser.parse_args()
    if args.learner_worker:
        learner_worker(Path(args.learner_worker[0]), [int(s) for s in args.learner_worker[1:]])
        return
    with tempfile.TemporaryDirectory(prefix="scaleout-bench-") as tmp:
        work = Path(tmp)
        learner = learner_table(args.steps, work)
        generators = generator_table(args.engine, work)
    print_tables(learner, generators, args.engine)
    if args.json:
        Path(args.json).write_text(json.dumps({"learner": learner, "generators": generators, "engine": args.engine},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
