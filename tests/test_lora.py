"""LoRA (spec.learner.lora): only the adapter trains, the reference is the base with the adapter off,
snapshots carry only the adapter (listed and hashed in the manifest, which names the base), engines
apply it (a tampered one is refused), a checkpoint resumes, and export writes the adapter or the
merged model."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from asyncrlhf.api import JobSpec
from asyncrlhf.backends import to_batch
from asyncrlhf.backends.torch_backend import TorchBackend
from asyncrlhf.lora import ADAPTER_WEIGHTS, AdapterError, adapter_state, apply_adapter, is_adapter, lora_config
from asyncrlhf.messages import Completion, RolloutGroup
from asyncrlhf.models import encode_prompt, load_causal_lm, load_tokenizer, resolve_model
from asyncrlhf.snapshots import ADAPTER_CONFIG, MANIFEST, SnapshotError, write_snapshot
from asyncrlhf.spec.lora import LoraSpec
from asyncrlhf.tasks import sort_digits_prompt

K, GROUPS = 4, 3


@pytest.fixture(scope="module")
def tiny() -> str:
    return resolve_model("builtin:tiny-sort")


def lora_spec(dtype: str = "float32", **lora) -> JobSpec:
    return JobSpec.model_validate({
        "model": {"dtype": dtype},
        "algorithm": {"loss": "grpo", "samplesPerPrompt": K},
        "learner": {"promptsPerStep": GROUPS, "microBatchSize": K, "optimizer": {"lr": 1e-2},
                    "lora": {"enabled": True, "rank": 4, "alpha": 8} | lora},
    })


def rollouts(tiny: str, batches: int, seed: int = 0) -> list[list[RolloutGroup]]:
    """Sort-digits prompts with random answers and mixed scores (log-probs 0: a ratio far from 1 is
    clipped, which these tests do not mind)."""
    rng, tokenizer = random.Random(seed), load_tokenizer(tiny)
    out = []
    for b in range(batches):
        groups = []
        for i in range(GROUPS):
            rec = sort_digits_prompt(rng)
            answers = [[rng.randrange(4, 14) for _ in range(rng.randint(2, 5))] + [2] for _ in range(K)]
            completions = [Completion(text="", token_ids=a, logprobs=[-1.0] * len(a), eos=True,
                                      score=rng.choice([0.0, 1.0])) for a in answers]
            groups.append(RolloutGroup(id=f"r{b}{i}", prompt_id=f"p{b}{i}", batch=b, index=i, prompt_text=rec.text,
                                       prompt_token_ids=encode_prompt(tokenizer, rec.text), completions=completions,
                                       policy_version=b, generator_id="t"))
        out.append(groups)
    return out


def perturb_adapter(model, seed: int = 0) -> None:
    """A fresh adapter is the base (B = 0); move B so the adapter changes the function."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)


# --- the spec -----------------------------------------------------------------------------------


def test_lora_is_off_by_default_and_targets_every_linear_layer():
    spec = JobSpec.model_validate({})
    assert spec.learner.lora.enabled is False
    assert spec.learner.lora.target_modules == ["all-linear"]


@pytest.mark.parametrize("lora,where", [
    ({"rank": 0}, "rank"), ({"rank": 1024}, "rank"), ({"alpha": 0}, "alpha"), ({"dropout": 1.0}, "dropout"),
    ({"targetModules": []}, "targetModules"), ({"targetModules": ["q_proj; rm"]}, "targetModules"),
    ({"targetModules": ["all-linear", "q_proj"]}, "all-linear"),
])
def test_bad_lora_settings_are_refused(lora, where):
    with pytest.raises(ValidationError, match=where):
        JobSpec.model_validate({"learner": {"lora": {"enabled": True} | lora}})


def test_lora_with_zero3_is_refused_with_what_to_do():
    with pytest.raises(ValidationError, match="zeroStage 2"):
        JobSpec.model_validate({"learner": {"backend": "deepspeed", "zeroStage": 3, "lora": {"enabled": True}}})
    JobSpec.model_validate({"learner": {"backend": "deepspeed", "zeroStage": 2, "lora": {"enabled": True}}})


def test_lora_with_another_reference_is_refused():
    with pytest.raises(ValidationError, match="leave model.reference empty"):
        JobSpec.model_validate({"model": {"policy": "org/a", "reference": "org/b"}, "learner": {"lora": {"enabled": True}}})
    JobSpec.model_validate({"model": {"policy": "org/a", "reference": "org/a"}, "learner": {"lora": {"enabled": True}}})


def test_peft_config_follows_the_spec():
    config = lora_config(LoraSpec(enabled=True, rank=8, alpha=4, dropout=0.1, target_modules=["q_proj", "v_proj"]))
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 4, 0.1)
    assert set(config.target_modules) == {"q_proj", "v_proj"}
    assert lora_config(LoraSpec()).target_modules == "all-linear"


def test_unknown_target_modules_are_refused_naming_the_field(tiny):
    with pytest.raises(AdapterError, match="targetModules"):
        TorchBackend(lora_spec(targetModules=["no_such_proj"]), tiny, tiny)


# --- the learner ------------------------------------------------------------------------------


def test_only_the_adapter_is_trained_and_counted(tiny):
    backend = TorchBackend(lora_spec(), tiny, tiny)
    optimized = [p for g in backend.optimizer.param_groups for p in g["params"]]
    names = {id(p): n for n, p in backend.model.named_parameters()}
    assert optimized and all("lora_A" in names[id(p)] or "lora_B" in names[id(p)] for p in optimized)
    # tiny-sort: hidden 64, intermediate 256, 2 layers; rank 4 on q,k,v,o (64x64), gate, up (64->256), down
    per_layer = 4 * 4 * (64 + 64) + 2 * 4 * (64 + 256) + 4 * (256 + 64)
    assert backend.parameter_count == sum(p.numel() for p in optimized) == 2 * per_layer
    assert backend.ref is None  # no second copy of the model


def test_reference_is_the_base_with_the_adapter_off(tiny):
    backend = TorchBackend(lora_spec(), tiny, tiny)
    perturb_adapter(backend.model)
    base = load_causal_lm(tiny).eval()
    ids = torch.tensor([[1, 5, 9, 4, 14, 7], [1, 8, 3, 14, 5, 6]])
    attn = torch.ones_like(ids)
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=attn).logits
        assert torch.equal(backend._reference_logits(ids, attn), want)
        adapted = backend.model(input_ids=ids, attention_mask=attn).logits
    assert (adapted - want).abs().max() > 1e-2  # the adapter is on for the policy


def test_training_moves_only_the_adapter_and_the_base_stays(tiny):
    backend = TorchBackend(lora_spec(), tiny, tiny)
    base_before = {n: p.clone() for n, p in backend.model.named_parameters() if "lora_" not in n}
    adapter_before = {k: v.clone() for k, v in adapter_state(backend.model).items()}
    for step, groups in enumerate(rollouts(tiny, 2)):
        backend.train_step(to_batch(groups, backend.pad_id), step)
    after = dict(backend.model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in base_before.items())
    moved = adapter_state(backend.model)
    assert any(not torch.equal(moved[k], v) for k, v in adapter_before.items() if "lora_B" in k)



def test_the_checkpoint_interval_follows_the_adapters_size():
    """sizing.py from backend.parameter_count: an 8B model's rank-16 adapter (41.9M parameters, counted
    in bench/lora_size_bench.py) is checkpointed with every snapshot, its full weights every 40th."""
    from asyncrlhf.sizing import checkpoint_every_steps

    spec = JobSpec.model_validate({"model": {"dtype": "bfloat16"}, "learner": {"lora": {"enabled": True}}})
    assert checkpoint_every_steps(spec, 41_943_040) == 1
    assert checkpoint_every_steps(spec, 8_030_261_248) == 40  # 12 B/param vs 15% of 2 B/param


# --- snapshots and checkpoints ----------------------------------------------------------------


def write_adapter_snapshot(backend: TorchBackend, root: Path, version: int):
    return write_snapshot(root, version, backend.save_weights)


def test_a_snapshot_is_the_adapter_only_hashed_in_a_manifest_naming_the_base(tiny, tmp_path):
    backend = TorchBackend(lora_spec(), tiny, tiny)
    perturb_adapter(backend.model)
    info = write_adapter_snapshot(backend, tmp_path, 1)
    files = {p.name for p in Path(info.path).iterdir()}
    assert files == {ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST}
    manifest = json.loads((Path(info.path) / MANIFEST).read_text())
    assert manifest["adapter"] == {"kind": "lora", "base": tiny}
    assert set(manifest["files"]) == {ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    assert all(len(entry["blake3"]) == 64 for entry in manifest["files"].values())
    # the adapter's bytes: 2 x rank-4 matrices per linear layer in fp32, a few kB of header
    weights = manifest["files"][ADAPTER_WEIGHTS]["size"]
    assert backend.parameter_count * 4 <= weights < backend.parameter_count * 4 + 16_384
    config = json.loads((Path(info.path) / ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 8, tiny)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_checkpoint_of_a_lora_run_resumes_to_the_same_step(tiny, tmp_path, dtype):
    """Train 2 steps, snapshot + checkpoint, train the 3rd; a fresh learner restored from the
    checkpoint trains the 3rd step to the same loss and adapter. In bf16 the base is bf16, the
    adapter fp32, the snapshot bf16, and the checkpoint holds the adapter's fp32 masters."""
    spec = lora_spec(dtype)
    batches = rollouts(tiny, 3)
    first = TorchBackend(spec, tiny, tiny)
    for step in range(2):
        first.train_step(to_batch(batches[step], first.pad_id), step)
    snapshot = write_adapter_snapshot(first, tmp_path, 2)
    (tmp_path / "checkpoint").mkdir()
    first.save_state(tmp_path / "checkpoint")
    masters = {"master.safetensors"} if dtype == "bfloat16" else set()
    assert {p.name for p in (tmp_path / "checkpoint").iterdir()} == {"optimizer.safetensors", "optimizer.json"} | masters
    if dtype == "bfloat16":
        assert {p.dtype for p in first.model.parameters() if not p.requires_grad} == {torch.bfloat16}
        assert {p.dtype for p in first.model.parameters() if p.requires_grad} == {torch.float32}
    want = first.train_step(to_batch(batches[2], first.pad_id), 2)

    fresh = TorchBackend(spec, tiny, tiny)
    fresh.load_weights(Path(snapshot.path))
    fresh.load_state(tmp_path / "checkpoint")
    got = fresh.train_step(to_batch(batches[2], fresh.pad_id), 2)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=1e-9)
    expected = adapter_state(first.model)
    assert all(torch.allclose(v, expected[k], atol=1e-7) for k, v in adapter_state(fresh.model).items())
    # the optimizer state is the adapter's: a checkpoint is a few times the adapter, not the model
    assert (tmp_path / "checkpoint" / "optimizer.safetensors").stat().st_size < 3 * fresh.parameter_count * 4 + 65_536


def test_an_adapter_of_another_shape_is_refused(tiny, tmp_path):
    info = write_adapter_snapshot(TorchBackend(lora_spec(rank=8), tiny, tiny), tmp_path, 1)
    with pytest.raises(AdapterError, match="does not fit"):
        TorchBackend(lora_spec(targetModules=["q_proj"]), tiny, tiny).load_weights(Path(info.path))


# --- generators --------------------------------------------------------------------------------


def test_the_hf_engine_applies_the_adapter_and_refuses_a_tampered_one(tiny, tmp_path):
    from asyncrlhf.engines.hf import HFEngine

    backend = TorchBackend(lora_spec(), tiny, tiny)
    perturb_adapter(backend.model)
    info = write_adapter_snapshot(backend, tmp_path, 1)
    engine = HFEngine(JobSpec.model_validate({"generator": {"engine": "hf"}}), tiny)
    ids = torch.tensor([[1, 5, 9, 4, 14, 7]])
    with torch.no_grad():
        base = engine.model(input_ids=ids).logits
        engine.reload(info.path, info.checksum)
        assert is_adapter(info.path)
        got = engine.model(input_ids=ids).logits
        want = backend.model.eval()(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5) and (got - base).abs().max() > 1e-2

    perturb_adapter(backend.model, seed=1)  # the next version, then a flipped byte in its adapter
    second = write_adapter_snapshot(backend, tmp_path, 2)
    weights = Path(second.path) / ADAPTER_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="corrupt"):
        engine.reload(second.path, second.checksum)
    with torch.no_grad():
        assert torch.equal(engine.model(input_ids=ids).logits, got)  # the old adapter stays




def test_the_evaluator_applies_adapter_snapshots_and_measures_kl_to_the_base_without_a_copy(tiny, tmp_path):
    from asyncrlhf.evaluation import Evaluator

    spec = JobSpec.model_validate(lora_spec().model_dump(by_alias=True) | {
        "eval": {"everySteps": 1, "numPrompts": 4, "samples": 2}, "generator": {"sampling": {"maxTokens": 6}}})
    evaluator = Evaluator.create(spec, tiny, tiny, tmp_path)
    assert evaluator.ref is None
    assert evaluator.evaluate(0, "", elapsed=0.0)["eval_kl"] == 0.0  # the base against itself
    backend = TorchBackend(lora_spec(), tiny, tiny)
    perturb_adapter(backend.model)
    info = write_adapter_snapshot(backend, tmp_path / "volume", 1)
    assert evaluator.evaluate(1, info.path, elapsed=1.0)["eval_kl"] > 0.0
    ids = torch.tensor([[1, 5, 9, 4, 14, 7]])
    with torch.no_grad():
        assert torch.allclose(evaluator.policy(input_ids=ids).logits, backend.model.eval()(input_ids=ids).logits,
                              atol=1e-5)



@pytest.mark.parametrize("rank,served", [(1, 1), (4, 8), (16, 16), (17, 32), (300, 320), (512, 512)])
def test_vllm_starts_with_lora_at_the_smallest_rank_it_serves(rank, served):
    from asyncrlhf.engines.vllm_engine import vllm_options

    options = vllm_options(lora_spec(rank=rank), on_cpu=True)
    assert (options["enable_lora"], options["max_lora_rank"], options["max_loras"]) == (True, served, 1)
    assert "enable_lora" not in vllm_options(JobSpec.model_validate({}), on_cpu=True)


def test_vllm_serves_each_verified_adapter_as_a_new_lora_request_and_keeps_the_old_on_a_tampered_one(tiny, tmp_path):
    """The engine's adapter switch without starting vLLM (its LoRA output is checked by a run:
    docs/lora.md): a sound snapshot becomes a new LoRARequest, a tampered one is refused first."""
    pytest.importorskip("vllm")
    from asyncrlhf.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine.__new__(VLLMEngine)  # no LLM: _use_adapter never touches it
    engine.lora_request, engine._lora_ids, engine.loaded = None, 0, tiny
    backend = TorchBackend(lora_spec(), tiny, tiny)
    first, second = (write_adapter_snapshot(backend, tmp_path, v) for v in (1, 2))
    engine.reload(first.path, first.checksum)
    assert (engine.lora_request.lora_int_id, engine.lora_request.lora_path) == (1, first.path)
    (Path(second.path) / ADAPTER_CONFIG).write_text("{}")
    with pytest.raises(SnapshotError, match="corrupt"):
        engine.reload(second.path, second.checksum)
    assert (engine.lora_request.lora_int_id, engine.lora_request.lora_path) == (1, first.path)


# --- export ------------------------------------------------------------------------------------

PROMPTS = ["3 1 2 =", "9 0 9 5 =", "7 7 1 ="]


def greedy(model, tokenizer) -> list[list[int]]:
    out = []
    for text in PROMPTS:
        ids = torch.tensor([encode_prompt(tokenizer, text)])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                             eos_token_id=2, pad_token_id=0)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def lora_run(tmp_path: Path, tiny: str) -> tuple[Path, TorchBackend]:
    """A run directory as `asyncrlhf run` leaves it for a LoRA job: job.yaml and an adapter snapshot."""
    import yaml

    from asyncrlhf.export import snapshot_tokenizer

    spec = lora_spec()
    run = tmp_path / "runs" / "job"
    run.mkdir(parents=True)
    (run / "job.yaml").write_text(yaml.safe_dump({"apiVersion": "asyncrlhf.dev/v1alpha1", "kind": "AsyncRLHFJob",
                                                  "metadata": {"name": "job"},
                                                  "spec": spec.model_dump(by_alias=True, mode="json")}))
    backend, tokenizer = TorchBackend(spec, tiny, tiny), snapshot_tokenizer(spec, tiny)
    perturb_adapter(backend.model, seed=5)

    def save(directory: Path):
        digests = backend.save_weights(directory)
        tokenizer.save_pretrained(directory)
        return digests

    write_snapshot(run / "volume", 4, save)
    return run, backend.model.eval()


def test_export_writes_the_adapter_or_the_merged_model_with_the_snapshots_greedy_tokens(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asyncrlhf.export import ExportError, export

    run, policy = lora_run(tmp_path, tiny)
    tokenizer = load_tokenizer(tiny)
    want = greedy(policy, tokenizer)
    assert want != greedy(load_causal_lm(tiny), tokenizer)  # the adapter changes what is generated

    adapter = export(run, tmp_path / "adapter")
    files = {p.name for p in adapter.iterdir()}
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "tokenizer.json"} <= files and not {MANIFEST, "config.json"} & files
    assert greedy(PeftModel.from_pretrained(load_causal_lm(tiny), str(adapter)), tokenizer) == want

    merged = export(run, tmp_path / "merged", merge=True)
    files = {p.name for p in merged.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not any(name.startswith("adapter_") for name in files)
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert greedy(model, AutoTokenizer.from_pretrained(merged)) == want

    with pytest.raises(ExportError, match="not empty"):
        export(run, merged, merge=True)



# --- a local run -------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_lora_example_runs_with_adapter_only_snapshots_and_its_reward_rises(tmp_path):
    """examples/lora.yaml (HF engine), 20 steps: every snapshot holds the adapter and no full weights,
    the summary reports the adapter's bytes, and the mean reward of the last 5 steps beats the first 5's."""
    import asyncio

    import yaml

    from asyncrlhf.api import AsyncRLHFJob
    from asyncrlhf.local import LocalRun
    from asyncrlhf.report import read_metrics

    manifest = yaml.safe_load((ROOT / "examples" / "lora.yaml").read_text())
    manifest["spec"]["learner"]["totalSteps"] = 20
    manifest["spec"]["weightSync"]["keepSnapshots"] = 30  # keep every snapshot, to look at each
    result = asyncio.run(LocalRun(AsyncRLHFJob.model_validate(manifest), tmp_path, quiet=True).run())
    assert result.ok, result.summary
    rewards = [row["reward_mean"] for row in read_metrics(result.run_dir)]
    assert len(rewards) == 20
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.05, rewards

    snapshots = sorted((result.run_dir / "volume" / "snapshots").iterdir())
    assert len(snapshots) == 20
    for snapshot in snapshots:
        weights = {p.name for p in snapshot.iterdir() if p.suffix == ".safetensors"}
        assert weights == {ADAPTER_WEIGHTS} and is_adapter(snapshot), snapshot
    summary = result.summary
    assert summary["snapshot_kind"] == "adapter"
    # rank 16 on 7 linear layers x 2 blocks of the tiny model, fp32: 47,104 parameters
    assert 47_104 * 4 <= summary["snapshot_weight_bytes"] < 47_104 * 4 + 16_384


# --- DeepSpeed ---------------------------------------------------------------------------------


def deepspeed_spec() -> JobSpec:
    return JobSpec.model_validate(lora_spec().model_dump(by_alias=True) | {
        "learner": lora_spec().learner.model_dump(by_alias=True) | {"backend": "deepspeed", "zeroStage": 2}})


def deepspeed_worker(out: Path) -> None:
    """DeepSpeed ZeRO-2 with LoRA on 2 processes (torchrun runs this file), driven as the learner
    drives it (rank 0 through the Leader, rank 1 following): 2 steps, snapshot + checkpoint, the 3rd
    step; then a fresh engine restored from them redoes the 3rd step."""
    import os

    from asyncrlhf.backends import follower_main, make_backend, release_followers

    spec = deepspeed_spec()
    if int(os.environ["RANK"]) > 0:
        follower_main(spec)
        follower_main(spec)
        return
    tiny = resolve_model("builtin:tiny-sort")
    batches = [to_batch(groups, 0) for groups in rollouts(tiny, 3)]
    first = make_backend(spec, tiny, tiny)
    try:
        metrics = [first.train_step(batches[s], s) for s in range(2)]
        write_snapshot(out, 2, first.save_weights)
        (out / "checkpoint").mkdir()
        first.save_state(out / "checkpoint")
        metrics.append(first.train_step(batches[2], 2))
        write_snapshot(out, 3, first.save_weights)
    finally:
        release_followers()
    fresh = make_backend(spec, tiny, tiny)
    try:
        fresh.load_weights(out / "snapshots" / "v2")
        fresh.load_state(out / "checkpoint")
        resumed = fresh.train_step(batches[2], 2)
    finally:
        release_followers()
    (out / "result.json").write_text(json.dumps({"metrics": metrics, "resumed": resumed}))


@pytest.mark.slow
def test_deepspeed_on_two_processes_trains_the_same_adapter_as_torch_and_resumes(tiny, tmp_path):
    import os
    import subprocess

    from asyncrlhf.bus import free_port

    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    torch_backend = TorchBackend(lora_spec(), tiny, tiny)
    want = [torch_backend.train_step(to_batch(g, torch_backend.pad_id), s) for s, g in enumerate(rollouts(tiny, 3))]
    for got, expected in zip(result["metrics"], want, strict=True):
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-4, abs=1e-6)
    assert result["resumed"]["loss"] == pytest.approx(result["metrics"][2]["loss"], rel=1e-6, abs=1e-9)
    assert {p.name for p in (tmp_path / "snapshots" / "v3").iterdir()} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST}
    from asyncrlhf.snapshots import load_snapshot_state

    trained = load_snapshot_state(tmp_path / "snapshots" / "v3")
    expected_state = adapter_state(torch_backend.model)
    assert set(trained) == set(expected_state)
    assert max((trained[k] - expected_state[k]).abs().max().item() for k in trained) < 1e-4
    # the DeepSpeed checkpoint resumes the torch backend too (same names, no pickle)
    other = TorchBackend(lora_spec(), tiny, tiny)
    other.load_weights(tmp_path / "snapshots" / "v2")
    other.load_state(tmp_path / "checkpoint")
    last = other.train_step(to_batch(rollouts(tiny, 3)[2], other.pad_id), 2)
    assert last["loss"] == pytest.approx(want[2]["loss"], rel=1e-4)


if __name__ == "__main__":
    torch.set_num_threads(1)
    deepspeed_worker(Path(sys.argv[1]))
