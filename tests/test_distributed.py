"""Scale-out for real: DeepSpeed ZeRO-2/3 on 2 CPU processes (gloo), snapshots into vLLM, many generators.

The DeepSpeed tests run this file itself under torchrun (the `__main__` block at the bottom is the
worker): rank 0 drives the backend through distributed.Leader exactly as the Learner does, rank 1
sits in follower_loop. The single-process TorchBackend trains on the same fixed rollouts here, and
the two must agree (see TOLERANCE).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nats

from asyncrlhf.api import JobSpec
from asyncrlhf.bus import GENERATORS_CONSUMER, PROMPTS, ROLLOUTS, connect, free_port
from asyncrlhf.backends import Batch, to_batch
from asyncrlhf.backends.deepspeed_backend import accumulation_steps
from asyncrlhf.backends.distributed import (Command, Rendezvous, decode_command, encode_command, node_process_envs,
                                            run_node)
from asyncrlhf.backends.micro import micro_plan, shard_groups
from asyncrlhf.backends.torch_backend import TorchBackend
from asyncrlhf.local import LocalRun
from asyncrlhf.messages import Completion, Prompt, RolloutGroup
from asyncrlhf.models import encode_prompt, load_causal_lm, load_tokenizer, resolve_model
from asyncrlhf.report import read_metrics
from asyncrlhf.snapshots import load_snapshot_state
from asyncrlhf.tasks import sort_digits_prompt

# float32 on both sides, but the sums over ranks and micro-batches run in another order: losses
# agree to ~1e-6 relative; weights mostly to ~1e-7, but Adam divides by sqrt(v), so a coordinate
# whose gradient is nearly zero turns a rounding difference into a visible step. With lr 3e-3 the
# weights move by ~1e-2 over these steps; 1e-4 is 1% of that (measured worst: 3e-5, ZeRO-3 + PPO).
TOLERANCE = {"loss_rtol": 1e-4, "loss_atol": 1e-6, "weight_atol": 1e-4}
STEPS, GROUPS, K = 3, 5, 4  # 5 groups on 2 ranks: shares of 3 and 2 (uneven on purpose)


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
        for i in range(GROUPS):
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


# algorithm.oldLogprobs: pi_old from the rollouts (behaviour) or recomputed by the learner at the start of
# each step (learner: on DeepSpeed each rank's forward over its share, gathered across ranks), with the
# truncated importance weight min(pi_old / pi_behaviour, cap) the learner switch allows
OLD_LOGPROBS = {"behaviour": {}, "learner": {"oldLogprobs": "learner", "importanceCap": 2.0}}


def train_spec(loss: str, stage: int, backend: str = "deepspeed", old_logprobs: str = "behaviour") -> JobSpec:
    return JobSpec.model_validate({
        "algorithm": {"loss": loss, "samplesPerPrompt": K, **OLD_LOGPROBS[old_logprobs]},
        "learner": {"backend": backend, "zeroStage": stage, "promptsPerStep": GROUPS, "microBatchSize": K,
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


@pytest.mark.parametrize("groups,k,micro,world,rank,steps,expected", [
    # one process: TorchBackend's split; (start, stop, real) per micro-batch
    (3, 2, 0, 1, 0, None, [(0, 6, True)]),                                   # 0: the whole batch at once
    (3, 2, 4, 1, 0, None, [(0, 4, True), (4, 6, True)]),                     # 2 groups, then the last one
    (3, 2, 5, 1, 0, None, [(0, 4, True), (4, 6, True)]),                     # rows rounded down to whole groups
    (3, 4, 2, 1, 0, None, [(0, 4, True), (4, 8, True), (8, 12, True)]),      # one group at least
    # DeepSpeed: 5 groups on 2 ranks (shares 3 and 2), padded to the configured steps
    (5, 4, 4, 2, 0, 3, [(0, 4, True), (4, 8, True), (8, 12, True)]),
    (5, 4, 4, 2, 1, 3, [(12, 16, True), (16, 20, True), (12, 16, False)]),
    (5, 4, 0, 2, 1, 1, [(12, 20, True)]),
    (7, 2, 4, 3, 2, 2, [(10, 14, True), (10, 14, False)]),                   # share 5..7 is one micro-batch
])
def test_micro_plan(groups, k, micro, world, rank, steps, expected):
    plan = micro_plan(groups, k, micro, world, rank, steps)
    assert [(rows.start, rows.stop, real) for rows, real in plan.micro_batches] == expected
    assert plan.steps == len(expected) and plan.real == [rows for rows, real in plan.micro_batches if real]
    assert (plan.share.start, plan.share.stop) == (expected[0][0], max(stop for _, stop, _ in expected))


def test_micro_plan_refuses_more_micro_batches_than_configured():
    with pytest.raises(ValueError, match="needs 3 micro-batches on rank 0, more than the 2"):
        micro_plan(5, 4, 4, 2, 0, steps=2)


@pytest.mark.parametrize("prompts,k,micro,world", [(5, 4, 4, 2), (5, 4, 0, 2), (8, 4, 8, 2), (7, 2, 6, 3)])
def test_deepspeed_config_agrees_with_every_ranks_plan(prompts, k, micro, world):
    from asyncrlhf.backends.deepspeed_backend import ds_config

    spec = JobSpec.model_validate({"algorithm": {"samplesPerPrompt": k},
                                   "learner": {"promptsPerStep": prompts, "microBatchSize": micro}})
    config = ds_config(spec, world)
    steps = config["gradient_accumulation_steps"]
    for rank in range(world):  # every rank fits the configured steps (else micro_plan raises)
        plan = micro_plan(prompts, k, micro, world, rank, steps)
        assert max(r.stop - r.start for r in plan.real) <= config["train_micro_batch_size_per_gpu"]
    assert len(micro_plan(prompts, k, micro, world, 0).real) == steps


class RecordingBackend:
    """A backend that records its calls; the channel records what was sent."""

    pad_id, parameter_count = 3, 1000
    vocab_size, max_positions = 0, 0  # unknown: not checked

    def __init__(self) -> None:
        self.calls = []

    def __getattr__(self, op):
        return lambda *args: self.calls.append((op, args)) or {"op": op}


def test_the_leader_forwards_every_method_of_the_protocol():
    from asyncrlhf.backends import TrainingBackend
    from asyncrlhf.backends.base import BACKEND_METHODS
    from asyncrlhf.backends.distributed import OPS, Leader, follower_loop

    sent = []
    channel = type("Channel", (), {"send": lambda self, cmd: sent.append(cmd)})()
    protocol = [name for name in dir(TrainingBackend) if not name.startswith("_") and callable(getattr(TrainingBackend, name))]
    assert sorted(BACKEND_METHODS) == sorted(protocol) and set(OPS) == {*protocol, "stop"}

    backend = RecordingBackend()
    leader = Leader(backend, channel)
    assert isinstance(leader, TrainingBackend) and (leader.pad_id, leader.parameter_count) == (3, 1000)
    batch = to_batch([RolloutGroup(id="r", prompt_id="p", batch=0, index=0, prompt_text="", prompt_token_ids=[1, 2],
                                   completions=[Completion(text="", token_ids=[5], logprobs=[-0.5], eos=True, score=1.0)] * 2,
                                   policy_version=0, generator_id="g")], 0)
    by_name = {"batch": batch, "step": 7, "directory": Path("/v/c")}  # what Command carries
    args = {op: tuple(by_name[p] for p in list(inspect.signature(getattr(TrainingBackend, op)).parameters)[1:])
            for op in BACKEND_METHODS}
    for op in BACKEND_METHODS:
        assert getattr(leader, op)(*args[op]) == {"op": op}
    assert [c[0] for c in backend.calls] == [c.op for c in sent] == list(BACKEND_METHODS)
    assert backend.calls == [(op, args[op]) for op in BACKEND_METHODS]

    # a follower makes the same calls from the commands, after an encode/decode round trip
    follower, wire = RecordingBackend(), iter([decode_command(encode_command(c)) for c in [*sent, Command("stop")]])
    assert follower_loop(follower, type("Wire", (), {"receive": lambda self: next(wire)})()) == len(BACKEND_METHODS)
    assert [op for op, _ in follower.calls] == list(BACKEND_METHODS)
    for op, got in follower.calls:
        assert len(got) == len(args[op]) and all(map(same_argument, got, args[op])), op


def same_argument(got, sent) -> bool:
    """A decoded argument equals the one sent (a Batch: its lists and tensors)."""
    if not isinstance(sent, Batch):
        return got == sent
    return (got.prompts, got.responses, got.group_size) == (sent.prompts, sent.responses, sent.group_size) and all(
        torch.equal(getattr(got, name), getattr(sent, name)) for name in ("old_logprobs", "mask", "raw_scores", "eos"))


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


def test_a_pods_processes_succeed_together_and_fail_with_the_first_failure(tmp_path):
    from test_core_loop import tiny_job

    from asyncrlhf.manifest import dump_manifest

    manifest = tmp_path / "job.yaml"
    manifest.write_text(dump_manifest(tiny_job("node")))
    envs = node_process_envs({"NNODES": "1", "NPROC_PER_NODE": "2"})
    assert run_node(envs, ["validate", str(manifest)]) == 0
    assert run_node(envs, ["validate", str(tmp_path / "missing.yaml")]) == 2  # EXIT_BAD_INPUT


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

# ZeRO-2, ZeRO-3 and ZeRO-1 with pi_old recomputed by the learner (one run per stage: results are keyed by
# it), in one launch (process start-up is the cost)
RUNS = (("grpo", 2, "behaviour"), ("ppo", 3, "behaviour"), ("proximal-rloo", 1, "learner"))


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory) -> dict[int, dict]:
    """Train with DeepSpeed on 2 processes (torchrun running this file), once for the module."""
    out = tmp_path_factory.mktemp("deepspeed")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    runs = [x for loss, stage, old_logprobs in RUNS for x in (loss, str(stage), old_logprobs)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__, str(out), *runs]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {stage: json.loads((out / f"zero{stage}" / "result.json").read_text()) | {"dir": out / f"zero{stage}"}
            for _, stage, _ in RUNS}


def torch_reference(spec: JobSpec, path: str, batches: list[list[RolloutGroup]]):
    backend = TorchBackend(spec, path, path)
    metrics = [backend.train_step(to_batch(groups, backend.pad_id), step) for step, groups in enumerate(batches)]
    return backend, metrics


def assert_close_weights(actual: dict, expected: dict, atol: float) -> None:
    assert set(actual) == set(expected)
    worst = max((actual[k].float() - expected[k].float()).abs().max().item() for k in expected)
    assert worst <= atol, f"weights differ by {worst:.3g} (> {atol})"


@pytest.mark.slow
@pytest.mark.parametrize("loss,stage,old_logprobs", RUNS)
def test_deepspeed_on_two_processes_matches_one_torch_process(deepspeed_runs, loss, stage, old_logprobs):
    result, out = deepspeed_runs[stage], deepspeed_runs[stage]["dir"]
    assert result["partitioned_at_load"] == (stage == 3)  # ZeRO-3 loads the policy under zero.Init
    path = resolve_model("builtin:tiny-sort")
    batches = fixed_rollouts(path, STEPS + 1)
    spec = train_spec(loss, stage, "torch", old_logprobs)
    backend, expected = torch_reference(spec, path, batches)

    for got, want in zip(result["metrics"], expected, strict=True):
        for name in ("loss", "kl", "grad_norm"):
            assert got[name] == pytest.approx(want[name], rel=TOLERANCE["loss_rtol"], abs=TOLERANCE["loss_atol"]), name
    after = load_snapshot_state(out / "snapshots" / f"v{STEPS + 1}")
    assert_close_weights(after, backend.model.state_dict(), TOLERANCE["weight_atol"])

    # resume: a fresh engine loads the checkpoint written after STEPS steps and redoes the last step ...
    assert result["resumed_metrics"] == pytest.approx(result["metrics"][-1], rel=1e-6, abs=1e-9)
    assert_close_weights(load_snapshot_state(out / "snapshots" / f"v{STEPS + 2}"), after, 1e-7)
    # ... and the same files resume the single-process torch backend (no pickle, any number of ranks)
    other = TorchBackend(spec, path, path)
    other.load_weights(out / "snapshots" / f"v{STEPS}")
    other.load_state(out / "checkpoint")
    last = other.train_step(to_batch(batches[STEPS], other.pad_id), STEPS)
    assert last["loss"] == pytest.approx(expected[STEPS]["loss"], rel=TOLERANCE["loss_rtol"])
    assert_close_weights(other.model.state_dict(), backend.model.state_dict(), TOLERANCE["weight_atol"])
    assert {f.suffix for f in out.rglob("*") if f.is_file()} <= {".json", ".safetensors"}


@pytest.mark.slow
def test_zero3_snapshot_loads_into_vllm_with_the_gathered_models_greedy_output(deepspeed_runs):
    from asyncrlhf.engines.vllm_engine import VLLMEngine
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    snapshot = deepspeed_runs[3]["dir"] / "snapshots" / f"v{STEPS + 1}"
    tiny = resolve_model("builtin:tiny-sort")
    tokenizer = load_tokenizer(tiny)
    prompts = [encode_prompt(tokenizer, t) for t in ("3 1 2 =", "9 0 9 5 =", "7 7 1 =", "4 2 8 6 1 =")]
    gathered = load_causal_lm(str(snapshot))
    assert any(not torch.equal(a, b) for a, b in zip(gathered.state_dict().values(),
                                                     load_causal_lm(tiny).state_dict().values()))
    expected = []
    for p in prompts:
        ids = torch.tensor([p])
        out = gathered.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                                eos_token_id=2, pad_token_id=0)[0, len(p):].tolist()
        expected.append(out[: out.index(2) + 1] if 2 in out else out)

    engine = VLLMEngine(JobSpec.model_validate({"generator": {"kvCacheGiB": 0.25}}), tiny)
    try:
        engine.reload(str(snapshot))
        outs = engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                   SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    finally:
        engine.close()
    assert [list(o.outputs[0].token_ids) for o in outs] == expected


# --- a local run: 2 generators, a 2-process learner, a generator killed --------------------


class GeneratorsNotReplaced(LocalRun):
    """A generator that dies stays gone (a replica scaled away), so the other must redo its work."""

    def _restart_dead_generators(self, progress=None) -> bool:
        return True  # nothing restarted, and the run goes on


async def _kill_a_busy_generator_then_a_learner_rank(run: LocalRun, after_step: int, ack_wait: float):
    """Freeze gen-1; once anything it held has gone back to the queue, only gen-0 takes prompts.
    Freeze gen-0 too and read what it holds (frozen, it cannot ack meanwhile); if anything, SIGKILL
    it, else let it run on and look again. Thaw gen-1. Two steps later SIGKILL learner rank 1.
    Returns (result, prompts gen-0 held, (prompt id, generator id) of every rollout published)."""
    task = asyncio.create_task(run.run())
    while not run.url or len(read_metrics(run.run_dir)) < after_step:
        assert not task.done(), "the run ended before the generator could be killed"
        await asyncio.sleep(0.2)
    nc = await connect(run.url)
    js, seen = nc.jetstream(), []

    async def record(msg):
        group = RolloutGroup.decode(msg.data)
        seen.append((group.prompt_id, group.generator_id))

    await nc.subscribe(run.bus.subject(ROLLOUTS), cb=record)
    gen0, gen1 = (next(c for c in run.children if c.role == "generator" and c.index == i) for i in (0, 1))
    os.kill(gen1.proc.pid, signal.SIGSTOP)
    await asyncio.sleep(ack_wait + 1.0)
    held: set[str] = set()
    while not held:
        assert not task.done(), "the run ended before gen-0 was caught holding prompts"
        if await unacked_prompts(js, run.bus):
            os.kill(gen0.proc.pid, signal.SIGSTOP)
            held = await unacked_prompts(js, run.bus)
            os.kill(gen0.proc.pid, signal.SIGKILL if held else signal.SIGCONT)
        await asyncio.sleep(0.02)
    os.kill(gen1.proc.pid, signal.SIGCONT)
    step = len(read_metrics(run.run_dir))
    while len(read_metrics(run.run_dir)) < step + 2:
        assert not task.done(), "the run ended before a learner rank could be killed"
        await asyncio.sleep(0.05)
    os.kill(run.learner_group()[1].proc.pid, signal.SIGKILL)
    result = await task
    await nc.close()
    return result, held, seen


async def unacked_prompts(js, bus) -> set[str]:
    """Ids of the prompts delivered to a generator and not acked yet (a work queue keeps only those)."""
    info = await js.consumer_info(bus.stream, GENERATORS_CONSUMER)
    ids = set()
    for seq in range(info.ack_floor.stream_seq + 1, info.delivered.stream_seq + 1):
        try:
            msg = await js.get_msg(bus.stream, seq)
        except nats.js.errors.NotFoundError:
            continue  # acked and gone
        if msg.subject == bus.subject(PROMPTS):
            ids.add(Prompt.decode(msg.data).id)
    return ids


@pytest.mark.slow
def test_two_generators_and_a_two_process_learner_survive_a_generator_and_a_learner_rank_killed(tmp_path):
    from test_core_loop import consumed_ids, tiny_job

    steps, prompts = 24, 4  # steps take ~0.3 s: enough of them to still be running after the freeze
    job = tiny_job("scaleout", generator={"engine": "hf", "replicas": 2}, nats={"ackWaitSeconds": 2},
                   learner={"totalSteps": steps, "promptsPerStep": prompts, "backend": "deepspeed",
                            "zeroStage": 2, "processesPerNode": 2})
    run = GeneratorsNotReplaced(job, tmp_path / "scaleout", quiet=True)
    result, held, seen = asyncio.run(_kill_a_busy_generator_then_a_learner_rank(run, after_step=2, ack_wait=2.0))

    summary = result.summary
    # the generator's death restarted nothing; rank 1's restarted the learner group once
    assert result.ok and summary["steps"] == steps and summary["learner_restarts"] == 1
    consumed = consumed_ids(run.run_dir)
    assert sorted(consumed) == sorted(f"r-scaleout-p{b}-{i}" for b in range(steps) for i in range(prompts))
    assert summary["staleness_max"] <= 1
    # what gen-0 held when it died was generated again, by gen-1
    redone = {prompt for prompt, generator in seen if generator == "gen-1-0"}
    assert held and held <= redone, (held, seen)
    learners = [(c.index, c.attempt, c.proc.returncode) for c in run.children if c.role == "learner"]
    assert [(rank, attempt) for rank, attempt, _ in learners] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    # attempt 0: rank 1 SIGKILLed, rank 0 killed by the runner or failed on its own; attempt 1 finished
    assert learners[1][2] == -signal.SIGKILL and learners[0][2] != 0 and learners[2][2] == learners[3][2] == 0
    assert "released by rank 0" in (run.run_dir / "learner-1.log").read_text()
    assert "resumed from" in (run.run_dir / "learner-0.log").read_text()


# --- the worker (torchrun runs this file) ------------------------------------------------


def worker(out: Path, loss: str, stage: int, old_logprobs: str) -> None:
    """Rank 0 drives the backend as the Learner does (through Leader), rank 1 follows; twice: the
    second time a fresh engine resumes from the first one's checkpoint."""
    from asyncrlhf.backends import follower_main, make_backend, release_followers
    from asyncrlhf.snapshots import write_snapshot

    spec = train_spec(loss, stage, old_logprobs=old_logprobs)
    if int(os.environ["RANK"]) > 0:
        follower_main(spec)
        follower_main(spec)
        return
    out.mkdir(parents=True)
    path = resolve_model("builtin:tiny-sort")
    batches = fixed_rollouts(path, STEPS + 1)
    last = to_batch(batches[STEPS], 0)
    leader = make_backend(spec, path, path)
    partitioned = leader.backend.partitioned_at_load
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
    (out / "result.json").write_text(json.dumps({"metrics": metrics, "resumed_metrics": resumed,
                                                 "partitioned_at_load": partitioned}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    root, runs = Path(sys.argv[1]), sys.argv[2:]
    for loss, stage, old_logprobs in zip(runs[::3], runs[1::3], runs[2::3]):
        worker(root / f"zero{stage}", loss, int(stage), old_logprobs)


async def _add_a_generator_after(run: LocalRun, after_step: int) -> tuple[object, int]:
    """Start a second generator once `after_step` steps are done. The learner is held (SIGSTOP)
    until the newcomer has reported in, or a short run could end before its first rollout."""
    task = asyncio.create_task(run.run())
    while len(read_metrics(run.run_dir)) < after_step:
        assert not task.done(), "the run ended before a generator could be added"
        await asyncio.sleep(0.1)
    learner = run.learner().proc
    os.kill(learner.pid, signal.SIGSTOP)
    run.spawn("generator", 1)  # what a new replica is: a process pointed at the same bus
    added_at = len(read_metrics(run.run_dir))
    nc = await connect(run.url)
    kv = await nc.jetstream().key_value(run.bus.bucket)
    try:
        for _ in range(1200):
            try:
                await kv.get("generator.gen-1-0")
                break
            except nats.js.errors.KeyNotFoundError:
                await asyncio.sleep(0.1)
        else:
            raise AssertionError("the added generator never reported in")
    finally:
        os.kill(learner.pid, signal.SIGCONT)
        await nc.close()
    return await task, added_at


@pytest.mark.slow
def test_a_generator_added_mid_run_takes_work_and_nothing_restarts(tmp_path):
    from test_core_loop import consumed_ids, tiny_job

    steps, prompts = 20, 4
    # N=4: several batches are out at once, so the newcomer finds work while gen-0 is busy
    job = tiny_job("added", generator={"engine": "hf", "replicas": 1}, **{"async": {"maxStaleness": 4}},
                   learner={"totalSteps": steps, "promptsPerStep": prompts})
    run = LocalRun(job, tmp_path / "added", quiet=True)
    result, added_at = asyncio.run(_add_a_generator_after(run, after_step=3))

    assert result.ok and result.summary["steps"] == steps and result.summary["learner_restarts"] == 0
    assert added_at < steps - 5, "added too late to show anything"
    # nothing was restarted: one learner process, gen-0's first attempt, the newcomer's first attempt
    assert sorted((c.role, c.index, c.attempt) for c in run.children) == [
        ("generator", 0, 0), ("generator", 1, 0), ("learner", 0, 0)]
    ledger = [json.loads(line) for line in (run.run_dir / "ledger.jsonl").read_text().splitlines()]
    by_generator = {gen for row in ledger for _id, gen, _v in row["rollouts"]}
    assert by_generator == {"gen-0-0", "gen-1-0"}  # the newcomer's rollouts were trained on
    first_new = min(row["step"] for row in ledger for _id, gen, _v in row["rollouts"] if gen == "gen-1-0")
    assert first_new > added_at
    consumed = consumed_ids(run.run_dir)
    assert sorted(consumed) == sorted(f"r-added-p{b}-{i}" for b in range(steps) for i in range(prompts))
    assert result.summary["staleness_max"] <= 4
