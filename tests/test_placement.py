"""Device placement (placement.py), sizing (sizing.py) and `asyncrlhf run --dry-run`: pure, tables.

Every expectation is written out by hand from the conventions in placement.py's docstring:
learner GPUs first (its ranks see all of them, rank l on cuda:l), then each generator its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncrlhf.api import JobSpec
from asyncrlhf.cli import main
from asyncrlhf.manifest import load_manifest
from asyncrlhf.placement import (
    PlacementError, check_tensor_parallel, describe, generator_devices, learner_device, machine_gpus, mask_secrets,
    plan,
)
from asyncrlhf.sizing import auto_checkpoint_publishes, checkpoint_bytes, checkpoint_every_steps, snapshot_bytes

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def spec(**sections) -> JobSpec:
    return JobSpec.model_validate(sections)


def gpus(n: int) -> list[str]:
    return [str(i) for i in range(n)]


def layout(placement) -> dict[str, tuple]:
    """name -> (GPUs, device, CUDA_VISIBLE_DEVICES or None, tensor parallel)"""
    return {p.name: (p.gpus, p.device, p.env.get("CUDA_VISIBLE_DEVICES"), p.tensor_parallel)
            for p in placement.processes}


# the same job on machines of 0, 1, 2, 4 and 8 GPUs
CPU_JOB = spec()  # the defaults: one CPU learner, one CPU generator
ONE_EACH = spec(generator={"resources": {"gpus": 1}}, learner={"gpusPerNode": 1})
DS_2_GEN_2 = spec(generator={"replicas": 2, "resources": {"gpus": 1}}, learner={"gpusPerNode": 2, "backend": "deepspeed"})
TP4_DS4 = spec(generator={"resources": {"gpus": 4}}, learner={"gpusPerNode": 4, "backend": "deepspeed"})


@pytest.mark.parametrize("job, machine, expected", [
    (CPU_JOB, 0, {"learner-0": ((), "cpu", None, 1), "generator-0": ((), "cpu", None, 1)}),
    # GPUs on the machine but none asked for: hidden from both, so nothing lands on GPU 0
    (CPU_JOB, 2, {"learner-0": ((), "cpu", "", 1), "generator-0": ((), "cpu", "", 1)}),
    (ONE_EACH, 2, {"learner-0": (("0",), "cuda:0", "0", 1), "generator-0": (("1",), "cuda:0", "1", 1)}),
    (ONE_EACH, 4, {"learner-0": (("0",), "cuda:0", "0", 1), "generator-0": (("1",), "cuda:0", "1", 1)}),
    (DS_2_GEN_2, 4, {"learner-0": (("0",), "cuda:0", "0,1", 1), "learner-1": (("1",), "cuda:1", "0,1", 1),
                     "generator-0": (("2",), "cuda:0", "2", 1), "generator-1": (("3",), "cuda:0", "3", 1)}),
    (TP4_DS4, 8, {**{f"learner-{r}": ((str(r),), f"cuda:{r}", "0,1,2,3", 1) for r in range(4)},
                  "generator-0": (("4", "5", "6", "7"), "cuda:0", "4,5,6,7", 4)}),
])
def test_every_process_gets_its_own_gpus(job, machine, expected) -> None:
    placement = plan(job, gpus(machine))
    assert layout(placement) == expected
    used = [g for p in placement.processes for g in p.gpus]
    assert len(used) == len(set(used))  # disjoint


@pytest.mark.parametrize("job, machine, needed", [
    (ONE_EACH, 0, "needs 2 GPUs"), (ONE_EACH, 1, "needs 2 GPUs"), (DS_2_GEN_2, 2, "needs 4 GPUs"),
    (TP4_DS4, 4, "needs 8 GPUs"),
])
def test_too_few_gpus_is_refused_saying_what_and_how(job, machine, needed) -> None:
    with pytest.raises(PlacementError, match=needed) as err:
        plan(job, gpus(machine))
    message = str(err.value)
    assert f"has {machine}" in message or "has none" in message
    assert "gpusPerNode" in message and "cluster" in message


def test_the_machines_gpu_ids_come_from_cuda_visible_devices() -> None:
    assert machine_gpus({"CUDA_VISIBLE_DEVICES": "3,5"}, 2) == ["3", "5"]
    assert machine_gpus({}, 3) == ["0", "1", "2"]
    assert machine_gpus({"CUDA_VISIBLE_DEVICES": "0"}, 0) == []  # a CPU build of torch sees none
    assert machine_gpus({"CUDA_VISIBLE_DEVICES": "0,0"}, 0) == ["0", "0"]  # one GPU shared on purpose
    shared = plan(ONE_EACH, ["0", "0"])
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in shared.processes] == ["0", "0"]
    placement = plan(ONE_EACH, ["3", "5"])
    assert placement.of("learner", 0).env["CUDA_VISIBLE_DEVICES"] == "3"
    assert placement.of("generator", 0).env["CUDA_VISIBLE_DEVICES"] == "5"


@pytest.mark.parametrize("reward, gpus_each, tp, expected", [
    # (reward section, generator gpus, tensorParallelSize) -> (GPUs, tensor parallel, reward device)
    ({"kind": "rule"}, 2, 0, (("0", "1"), 2, "")),
    ({"kind": "model", "model": "rm"}, 1, 0, (("0",), 1, "cuda:0")),  # shares the engine's GPU
    ({"kind": "model", "model": "rm", "device": "dedicated"}, 2, 0, (("0", "1"), 1, "cuda:1")),
    ({"kind": "model", "model": "rm", "device": "dedicated"}, 3, 0, (("0", "1", "2"), 2, "cuda:2")),
    ({"kind": "onepass"}, 4, 2, (("0", "1", "2", "3"), 2, "cuda:0")),
    ({"kind": "onepass"}, 0, 0, ((), 1, "cpu")),
])
def test_generator_layout_tensor_parallel_and_reward_gpu(reward, gpus_each, tp, expected) -> None:
    job = spec(task={"reward": reward}, generator={"resources": {"gpus": gpus_each}, "tensorParallelSize": tp})
    p = plan(job, gpus(gpus_each)).of("generator", 0)
    assert (p.gpus, p.tensor_parallel, p.reward_device) == expected


@pytest.mark.parametrize("generator, reward, field", [
    ({"resources": {"gpus": 2}, "tensorParallelSize": 4}, {}, "generator.tensorParallelSize"),
    ({"resources": {"gpus": 1}}, {"kind": "model", "model": "rm", "device": "dedicated"}, "task.reward.device"),
    ({"resources": {"gpus": 2}, "engine": "hf"}, {}, "generator.engine"),
])
def test_generator_gpu_settings_vllm_cannot_serve_are_refused_by_the_spec(generator, reward, field) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        spec(generator=generator, task={"reward": reward} if reward else {})


@pytest.mark.parametrize("tp, heads, kv, ok", [
    (1, 6, 6, True), (2, 6, 6, True), (3, 6, 6, True), (4, 6, 6, False), (8, 32, 8, True),
    (16, 32, 8, True),  # fewer KV heads than GPUs: replicated
    (4, 32, 6, False), (3, 32, 8, False), (2, 40, 5, False),
])
def test_tensor_parallel_must_divide_the_heads(tp, heads, kv, ok) -> None:
    if ok:
        check_tensor_parallel(tp, heads, kv)
        return
    with pytest.raises(PlacementError, match=r"generator\.tensorParallelSize: .* use one of \["):
        check_tensor_parallel(tp, heads, kv)


def test_plan_checks_tensor_parallelism_when_the_heads_are_known() -> None:
    job = spec(generator={"resources": {"gpus": 4}})
    plan(job, gpus(4), heads=(32, 8))
    with pytest.raises(PlacementError, match=r"use one of \[1, 2, 3, 6\]"):
        plan(job, gpus(4), heads=(6, 6))


def test_torch_backend_with_several_gpus_is_refused() -> None:
    with pytest.raises(PlacementError, match="learner.backend 'torch' trains in one process"):
        plan(spec(learner={"gpusPerNode": 2}), gpus(2))


@pytest.mark.parametrize("gpus_per_node, local_rank, cuda, expected", [
    (0, 0, 0, "cpu"), (0, 0, 8, "cpu"), (1, 0, 1, "cuda:0"), (4, 3, 4, "cuda:3"),
    (1, 0, 0, "no CUDA"), (4, 3, 2, "LOCAL_RANK=3"),
])
def test_learner_device(gpus_per_node, local_rank, cuda, expected) -> None:
    if expected.startswith(("cpu", "cuda")):
        assert learner_device(gpus_per_node, local_rank, cuda) == expected
        return
    with pytest.raises(PlacementError) as err:
        learner_device(gpus_per_node, local_rank, cuda)
    assert ("learner.gpusPerNode is 1 but this process sees 0 CUDA" in str(err.value)) if expected == "no CUDA" \
        else expected in str(err.value)


def test_generator_devices() -> None:
    dedicated = spec(task={"reward": {"kind": "model", "model": "rm", "device": "dedicated"}},
                     generator={"resources": {"gpus": 2}})
    assert generator_devices(dedicated, 2) == ("cuda:0", "cuda:1")
    assert generator_devices(CPU_JOB, 0) == ("cpu", "cpu")
    with pytest.raises(PlacementError, match="generator.resources.gpus is 2 but this process sees 0"):
        generator_devices(dedicated, 0)


def test_secrets_are_masked() -> None:
    env = {"ASYNCRLHF_NATS_PASSWORD": "hunter2", "HF_TOKEN": "hf_x", "AWS_SECRET_ACCESS_KEY": "k",
           "ASYNCRLHF_NATS_CREDS": "/creds", "API_KEY": "k", "CUDA_VISIBLE_DEVICES": "0", "KEYRING_X": "v",
           "ASYNCRLHF_NATS_URL": "nats://x"}
    assert mask_secrets(env) == env | {"ASYNCRLHF_NATS_PASSWORD": "****", "HF_TOKEN": "****",
                                       "AWS_SECRET_ACCESS_KEY": "****", "ASYNCRLHF_NATS_CREDS": "****",
                                       "API_KEY": "****"}
    lines = describe(plan(ONE_EACH, gpus(2)), {"learner-0": {"ASYNCRLHF_NATS_PASSWORD": "hunter2"}})
    assert "    ASYNCRLHF_NATS_PASSWORD=****" in lines and not any("hunter2" in line for line in lines)


# --- the examples: each model on a GPU of its own, disjoint ----------------------------------


def test_examples_were_found() -> None:
    assert len(EXAMPLES) >= 7


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
@pytest.mark.parametrize("machine", [0, 1, 2, 4, 8])
def test_every_example_gets_the_gpus_it_asks_for(path, machine) -> None:
    job = load_manifest(str(path)).spec
    learner, per_gen = job.learner.nodes * job.learner.gpus_per_node, job.generator.resources.gpus
    wanted = learner + job.generator.replicas * per_gen
    if wanted > machine:
        with pytest.raises(PlacementError, match=f"needs {wanted} GPUs"):
            plan(job, gpus(machine))
        return
    placement = plan(job, gpus(machine))
    used = [g for p in placement.processes for g in p.gpus]
    assert len(used) == len(set(used)) == wanted
    for p in placement.processes:
        asks = job.learner.gpus_per_node if p.role == "learner" else per_gen
        assert p.device.startswith("cuda") == bool(asks)  # every model of a GPU process is on a GPU
        if p.reward_device:
            assert p.reward_device.startswith("cuda") == bool(asks)


def test_gpu_examples_put_every_model_on_a_gpu_in_the_dry_run(tmp_path, capsys, monkeypatch) -> None:
    """`asyncrlhf run --dry-run --gpus 8` through the CLI, once per GPU example."""
    monkeypatch.setenv("ASYNCRLHF_NATS_PASSWORD", "hunter2")
    checked = 0
    for path in EXAMPLES:
        job = load_manifest(str(path))
        if not (job.spec.learner.gpus_per_node or job.spec.generator.resources.gpus):
            continue
        assert main(["run", "--dry-run", str(path), "--gpus", "8", "--runs-dir", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        blocks = [line for line in out.splitlines() if line.startswith(("learner-", "generator-"))]
        assert blocks and all("device=cuda:" in b and " GPU " in b for b in blocks), out
        assert all("reward_model=cuda:" in b for b in blocks if "reward_model=" in b)
        assert "hunter2" not in out and "ASYNCRLHF_NATS_PASSWORD=****" in out
        assert not (tmp_path / job.metadata.name).exists()  # nothing started
        checked += 1
    assert checked >= 5


def test_dry_run_without_enough_gpus_exits_2(tmp_path, capsys) -> None:
    assert main(["run", "--dry-run", str(REPO / "examples" / "tldr-online-dpo.yaml"), "--gpus", "2",
                 "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs 4 GPUs" in err and "has 2" in err


# --- sizing: the checkpoint interval and the bytes ---------------------------------------


@pytest.mark.parametrize("params, dtype, publishes", [
    (130_000, "float32", 1),  # the tiny model: a 1 MB checkpoint goes with every snapshot
    (100_000_000, "float32", 1),  # 0.8 GB of moments: still under 1 GiB
    (322_000_000, "float32", 14),  # 2.58 GB / (0.15 x 1.29 GB) = 13.3
    (1_000_000_000, "bfloat16", 40),  # 12 GB / (0.15 x 2 GB)
    (8_000_000_000, "bfloat16", 40),
    (70_000_000_000, "bfloat16", 40),
])
def test_the_checkpoint_interval_from_the_model_size(params, dtype, publishes) -> None:
    assert auto_checkpoint_publishes(params, dtype) == publishes


def test_checkpoint_interval_is_the_specs_when_set_and_a_multiple_of_k() -> None:
    assert checkpoint_bytes(8_000_000_000, "bfloat16") == 96_000_000_000
    assert snapshot_bytes(8_000_000_000, "bfloat16") == 16_000_000_000
    assert checkpoint_every_steps(spec(weightSync={"everySteps": 2}, model={"dtype": "bfloat16"}), 8 * 10**9) == 80
    assert checkpoint_every_steps(spec(weightSync={"everySteps": 2}), 8 * 10**9) == 28  # fp32: 2x, 14 publishes
    assert checkpoint_every_steps(spec(weightSync={"everySteps": 2, "checkpointEverySteps": 6}), 10**10) == 6
    with pytest.raises(ValueError, match=r"weightSync\.checkpointEverySteps"):
        spec(weightSync={"everySteps": 2, "checkpointEverySteps": 5})
