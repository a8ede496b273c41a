"""Scale-out for real: DeepSpeed ZeRO-2/3 on 2 CPU processes (gloo), snapshots into vLLM, many generators.

The DeepSpeed tests run this file itself under torchrun (the `__main__` block at the bottom is the
worker): rank 0 drives the backend through distributed.Leader exactly as the Learner does, rank 1
sits in follower_loop. The single-process TorchBackend trains on the same fixed rollouts here, and
the two must agree (see TOLERANCE).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asyncrlhf.api import JobSpec
from asyncrlhf.bus import free_port
from asyncrlhf.deepspeed_backend import accumulation_steps, shard_groups
from asyncrlhf.distributed import Command, Rendezvous, decode_command, encode_command, node_process_envs
from asyncrlhf.messages import Completion, RolloutGroup
from asyncrlhf.models import encode_prompt, load_causal_lm, load_tokenizer, resolve_model
from asyncrlhf.snapshots import load_snapshot_state
from asyncrlhf.tasks import sort_digits_prompt
from asyncrlhf.training import Batch, TorchBackend, to_batch

# float32 on both sides, but the sums over ranks and micro-batches run in another order: losses
# agree to ~1e-6 relative; weights mostly to ~1e-7, but Adam divides by sqrt(v), so a coordinate
# whose gradient is nearly zero turns a rounding difference into a visible step. With lr 3e-3 the
# weights move by ~1e-2 over these steps; 1e-4 is 1% of that (measured worst: 3e-5, ZeRO-3 + PPO).
TOLERANCE = {"loss_rtol": 1e-4, "loss_atol": 1e-6, "weight_atol": 1e-4}
STEPS, PROMPTS, K = 3, 5, 4  # 5 groups on 2 ranks: shares of 3 and 2 (uneven on purpose)


# --- fixed rollouts and specs ------------------------------------------------------------


def fixed_rollouts(model_path: str, batches: int, seed: int = 0) -> list[list[RolloutGroup]]:
    """Synthetic but realistic rollout batches: sort-digits prompts, random answers of varied
    length, their true log-probs under the initial policy (ratios near 1), mixed scores and EOS."""
    from asyncrlhf.logprobs import sequence_token_logprobs

    rng = random.Random(seed)
    tokenizer, model = load_tokenizer(model_path), load_causal_lm(model_path)
    out = []
    for b in range(batches):
        groups = []
        for i in range(PROMPTS):
            rec = sort_digits_prompt(rng)
            ids = encode_prompt(tokenizer, rec.text)
            answers = [[rng.randrange(4, 14) for _ in range(rng.randint(2, 7))] + [2] for _ in range(K)]
            logprobs = sequence_token_logprobs(model, [ids] * K, answers, 0.7, 0)
            completions = [Completion(text="", token_ids=a, logprobs=lp, eos=rng.random() < 0.85,
                                      score=rng.choice([0.0, 0.25, 1.0])) for a, lp in zip(answers, logprobs)]
            groups.append(RolloutGroup(id=f"r-{b}-{i}", prompt_id=f"p-{b}-{i}", batch=b, index=i, prompt_text=rec.text,
                                       prompt_token_ids=ids, completions=completions, policy_version=b,
                                       generator_id="fixed"))
        out.append(groups)
    return out


def train_spec(loss: str, stage: int, backend: str = "deepspeed") -> JobSpec:
    return JobSpec.model_validate({
        "algorithm": {"loss": loss, "samplesPerPrompt": K},
        "learner": {"backend": backend, "zeroStage": stage, "promptsPerStep": PROMPTS, "microBatchSize": K,
                    "optimizer": {"lr": 3e-3, "maxGradNorm": 1.0}},
    })


# --- pure pieces -------------------------------------------------------------------------


@pytest.mark.parametrize("groups,world,shares", [
    (5, 2, [range(0, 3), range(3, 5)]),
    (4, 2, [range(0, 2), range(2, 4)]),
    (3, 3, [range(0, 1), range(1, 2), range(2, 3)]),
    (7, 3, [range(0, 3), range(3, 5), range(5, 7)]),
])
def test_shards_are_whole_contiguous_groups_covering_the_batch(groups, world, shares):
    assert [shard_groups(groups, world, r) for r in range(world)] == shares


@pytest.mark.parametrize("prompts,k,micro,world,steps", [
    (5, 4, 4, 2, 3),   # shares 3 and 2 groups, one group per micro-batch
    (5, 4, 0, 2, 1),   # no micro-batching: one per rank
    (8, 4, 8, 2, 2),   # 4 groups each, 2 per micro-batch
    (8, 4, 0, 1, 1),
])
def test_accumulation_steps_are_fixed_by_the_spec(prompts, k, micro, world, steps):
    spec = JobSpec.model_validate({"algorithm": {"samplesPerPrompt": k},
                                   "learner": {"promptsPerStep": prompts, "microBatchSize": micro}})
    assert accumulation_steps(spec, world) == steps


@pytest.mark.parametrize("env,expected", [
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "7"},
     Rendezvous(3, 4, 1, 2, "h", 7)),  # torchrun / asyncrlhf run
    ({"RANK": "2", "WORLD_SIZE": "3", "NPROC_PER_NODE": "1", "MASTER_ADDR": "job-learner-0.job-learner"},
     Rendezvous(2, 3, 0, 1, "job-learner-0.job-learner", 29500)),  # operator pod, one process
    ({"JOB_COMPLETION_INDEX": "1", "NNODES": "2"}, Rendezvous(1, 2, 0, 1, "127.0.0.1", 29500)),
    ({}, Rendezvous()),
])
def test_rendezvous_from_env(env, expected):
    assert Rendezvous.from_env(env) == expected


def test_an_operator_pod_with_several_processes_starts_them_with_global_ranks():
    env = {"RANK": "1", "NODE_RANK": "1", "WORLD_SIZE": "2", "NNODES": "2", "NPROC_PER_NODE": "2",
           "MASTER_ADDR": "m", "MASTER_PORT": "29500"}
    envs = node_process_envs(env)
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"]) for e in envs] == [("2", "0", "4"), ("3", "1", "4")]
    assert [Rendezvous.from_env(e) for e in envs][1] == Rendezvous(3, 4, 1, 2, "m", 29500)
    with pytest.raises(RuntimeError, match="NPROC_PER_NODE"):
        Rendezvous.from_env(env)
    assert node_process_envs({"LOCAL_RANK": "0", **env}) == []


def test_commands_round_trip_without_pickle():
    path = resolve_model("builtin:tiny-sort")
    batch = to_batch(fixed_rollouts(path, 1)[0], 0)
    data = encode_command(Command("train_step", step=7, batch=batch))
    assert b"pickle" not in data and data[8:9] == b"{"  # safetensors: a JSON header, raw tensors
    back = decode_command(data)
    assert (back.op, back.step, back.batch.prompts, back.batch.responses, back.batch.group_size) == (
        "train_step", 7, batch.prompts, batch.responses, K)
    for name in ("old_logprobs", "mask", "raw_scores", "eos"):
        assert torch.equal(getattr(back.batch, name), getattr(batch, name))
    assert decode_command(encode_command(Command("save_state", path="/v/c"))).path == "/v/c"


# --- DeepSpeed on 2 processes against one torch process ----------------------------------


def torch_reference(spec: JobSpec, path: str, batches: list[list[RolloutGroup]]):
    torch.manual_seed(0)
    backend = TorchBackend(spec, path, path)
    metrics = [backend.train_step(to_batch(groups, backend.pad_id), step) for step, groups in enumerate(batches)]
    return backend, metrics


def run_workers(tmp_path: Path, loss: str, stage: int) -> dict:
    out = tmp_path / f"zero{stage}"
    out.mkdir()
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__, str(out), loss, str(stage)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "result.json").read_text()) | {"dir": str(out)}


def assert_close_weights(actual: dict, expected: dict, atol: float) -> None:
    assert set(actual) == set(expected)
    worst = max((actual[k].float() - expected[k].float()).abs().max().item() for k in expected)
    assert worst <= atol, f"weights differ by {worst:.3g} (> {atol})"



@pytest.mark.slow
@pytest.mark.parametrize("loss,stage", [("grpo", 2), ("ppo", 3)])
def test_deepspeed_on_two_processes_matches_one_torch_process(tmp_path, loss, stage):
    path = resolve_model("builtin:tiny-sort")
    batches = fixed_rollouts(path, STEPS + 1)
    result = run_workers(tmp_path, loss, stage)
    backend, expected = torch_reference(train_spec(loss, stage, "torch"), path, batches)

    for got, want in zip(result["metrics"], expected):
        for name in ("loss", "kl", "grad_norm"):
            assert got[name] == pytest.approx(want[name], rel=TOLERANCE["loss_rtol"], abs=TOLERANCE["loss_atol"]), name
    after = load_snapshot_state(Path(result["dir"]) / "snapshots" / f"v{STEPS + 1}")
    assert_close_weights(after, backend.model.state_dict(), TOLERANCE["weight_atol"])

    # resume: the rank-0 checkpoint after STEPS steps, loaded back, redoes the last step identically ...
    assert result["resumed_metrics"] == pytest.approx(result["metrics"][-1], rel=1e-6, abs=1e-9)
    resumed = load_snapshot_state(Path(result["dir"]) / "snapshots" / f"v{STEPS + 2}")
    assert_close_weights(resumed, after, 1e-7)
    # ... and the same files resume the single-process torch backend (no pickle, any number of ranks)
    other = TorchBackend(train_spec(loss, stage, "torch"), path, path)
    snapshot, checkpoint = Path(result["dir"]) / "snapshots" / f"v{STEPS}", Path(result["dir"]) / "checkpoint"
    other.load_weights(snapshot)
    other.load_state(checkpoint)
    last = other.train_step(to_batch(batches[STEPS], other.pad_id), STEPS)
    assert last["loss"] == pytest.approx(expected[STEPS]["loss"], rel=TOLERANCE["loss_rtol"])
    assert_close_weights(other.model.state_dict(), backend.model.state_dict(), TOLERANCE["weight_atol"])
    assert not list(Path(result["dir"]).rglob("*.pt")) and not list(Path(result["dir"]).rglob("*.bin"))


# --- the worker (torchrun runs this file) ------------------------------------------------


def worker(out: Path, loss: str, stage: int) -> None:
    """Rank 0 drives the backend as the Learner does (through Leader), rank 1 follows; twice: the
    second time a fresh engine resumes from the first one's checkpoint."""
    from asyncrlhf.distributed import follower_main, release_followers
    from asyncrlhf.snapshots import write_snapshot
    from asyncrlhf.training import make_backend

    torch.set_num_threads(1)
    spec = train_spec(loss, stage)
    if int(os.environ["RANK"]) > 0:
        follower_main(spec)
        follower_main(spec)
        return
    path = resolve_model("builtin:tiny-sort")
    batches = fixed_rollouts(path, STEPS + 1)
    last = to_batch(batches[STEPS], 0)
    leader = make_backend(spec, path, path)
    try:
        metrics = [leader.train_step(to_batch(groups, leader.pad_id), step) for step, groups in enumerate(batches[:STEPS])]
        snapshot = write_snapshot(out, STEPS, leader.save_weights)
        (out / "checkpoint").mkdir()
        leader.save_state(out / "checkpoint")
        metrics.append(leader.train_step(last, STEPS))
        write_snapshot(out, STEPS + 1, leader.save_weights)
    finally:
        release_followers()
    fresh = make_backend(spec, path, path)
    try:
        fresh.load_weights(Path(snapshot.path))
        fresh.load_state(out / "checkpoint")
        resumed = fresh.train_step(last, STEPS)
        write_snapshot(out, STEPS + 2, fresh.save_weights)
    finally:
        release_followers()
    (out / "result.json").write_text(json.dumps({"metrics": metrics, "resumed_metrics": resumed}))


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
