"""Weight sync at model scale, on the tiny model: snapshots in the model's dtype hashed while written,
verified while loaded (one read), refused when corrupt; the bf16 learner's masters in its checkpoint;
vLLM's options on CPU and GPU. The timings are bench/weight_sync_bench.py's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from asyncrlhf.api import JobSpec
from asyncrlhf.backends.weights import save_snapshot_files
from asyncrlhf.engines.verified import load_verified_state, verify_during
from asyncrlhf.engines.vllm_engine import vllm_options
from asyncrlhf.snapshots import MANIFEST, SnapshotError, verify_snapshot, write_snapshot
from asyncrlhf.weightfiles import file_digest, read_hashed, tensors_from_buffer, write_safetensors


def small_model(tied: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(config)


def test_streamed_file_is_safetensors_and_its_digest_is_the_files(tmp_path) -> None:
    tensors = [("a", torch.randn(3, 5)), ("b", torch.arange(7)), ("empty", torch.zeros(0, 4)),
               ("c", torch.randn(2, 2, dtype=torch.float64))]
    digest = write_safetensors(tmp_path / "x.safetensors", tensors, torch.bfloat16)
    assert digest == file_digest(tmp_path / "x.safetensors")
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back["a"].dtype == torch.bfloat16 and torch.equal(back["a"], tensors[0][1].to(torch.bfloat16))
    assert back["b"].dtype == torch.int64 and torch.equal(back["b"], tensors[1][1])  # integers keep their dtype
    assert back["empty"].shape == (0, 4) and back["c"].dtype == torch.bfloat16
    buf, again = read_hashed(tmp_path / "x.safetensors")
    assert again == digest
    views = tensors_from_buffer(buf)
    assert all(torch.equal(views[k], back[k]) for k in back)


@pytest.mark.parametrize("tied", [False, True])
def test_snapshot_in_bf16_loads_verified_in_one_read(tmp_path, tied) -> None:
    model = small_model(tied)
    info = write_snapshot(tmp_path, 3, lambda d: save_snapshot_files(model, d, "bfloat16"))
    manifest = json.loads((Path(info.path) / MANIFEST).read_text())
    assert set(manifest["files"]["model.safetensors"]) == {"size", "blake3"}
    verify_snapshot(info.path, info.checksum)
    state = load_verified_state(info.path, info.checksum)
    expected = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    assert set(state) == set(expected) and all(torch.equal(state[k], expected[k]) for k in expected)
    reloaded = small_model(tied)
    reloaded.load_state_dict(state, strict=True)  # the HF engine's reload


def test_a_corrupt_snapshot_is_refused_before_anything_is_loaded(tmp_path) -> None:
    info = write_snapshot(tmp_path, 1, lambda d: save_snapshot_files(small_model(), d, "float32"))
    weights = Path(info.path) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # same size, one byte flipped
    weights.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="model.safetensors is corrupt"):
        load_verified_state(info.path, info.checksum)
    with pytest.raises(SnapshotError, match="corrupt"):
        verify_snapshot(info.path, info.checksum)
    with pytest.raises(SnapshotError, match="checksum does not match"):
        load_verified_state(info.path, "0" * 64)


def test_a_manifest_naming_a_file_outside_the_snapshot_is_refused(tmp_path) -> None:
    import hashlib

    (tmp_path / "s").mkdir()
    raw = json.dumps({"version": 1, "files": {"../x.safetensors": {"size": 1, "blake3": "00"}}}).encode()
    (tmp_path / "s" / MANIFEST).write_bytes(raw)
    with pytest.raises(SnapshotError, match="not a file of the snapshot"):
        load_verified_state(tmp_path / "s", hashlib.sha256(raw).hexdigest())


def test_sha256_manifests_still_verify(tmp_path) -> None:
    import hashlib

    info = write_snapshot(tmp_path, 1, lambda d: save_snapshot_files(small_model(), d, "float32"))
    path = Path(info.path)
    manifest = json.loads((path / MANIFEST).read_text())
    for name, entry in manifest["files"].items():
        entry.pop("blake3")
        entry["sha256"] = hashlib.sha256((path / name).read_bytes()).hexdigest()
    raw = json.dumps(manifest).encode()
    (path / MANIFEST).write_bytes(raw)
    verify_snapshot(path, hashlib.sha256(raw).hexdigest())
    assert load_verified_state(path, hashlib.sha256(raw).hexdigest())


def test_verify_during_a_load_restores_the_old_weights_when_the_snapshot_is_corrupt(tmp_path) -> None:
    info = write_snapshot(tmp_path, 1, lambda d: save_snapshot_files(small_model(), d, "float32"))
    calls = []
    verify_during(info.path, info.checksum, lambda: calls.append("load"), lambda: calls.append("restore"))
    assert calls == ["load"]
    (Path(info.path) / "config.json").write_text("{}")
    with pytest.raises(SnapshotError, match="config.json"):
        verify_during(info.path, info.checksum, lambda: calls.append("load"), lambda: calls.append("restore"))
    assert calls == ["load", "load", "restore"]


@pytest.mark.parametrize("generator, on_cpu, expected", [
    ({}, True, {"enforce_eager": True, "kv_cache_memory_bytes": 1 << 29}),
    ({"resources": {"gpus": 1}}, False, {"enforce_eager": False, "tensor_parallel_size": 1,
                                          "gpu_memory_utilization": 0.85}),
    ({"resources": {"gpus": 4}, "memoryFraction": 0.6}, False,
     {"enforce_eager": False, "tensor_parallel_size": 4, "gpu_memory_utilization": 0.6,
      "distributed_executor_backend": "mp"}),
    ({"resources": {"gpus": 4}, "tensorParallelSize": 2}, False, {"tensor_parallel_size": 2}),
])
def test_vllm_options(generator, on_cpu, expected) -> None:
    options = vllm_options(JobSpec.model_validate({"generator": generator}), on_cpu)
    assert {k: options[k] for k in expected} == expected
    assert ("tensor_parallel_size" in options) != on_cpu


def test_bf16_learner_publishes_bf16_and_keeps_fp32_masters_in_its_checkpoint(tmp_path) -> None:
    from asyncrlhf.backends.torch_backend import TorchBackend
    from asyncrlhf.models import resolve_model

    path = resolve_model("builtin:tiny-sort")
    spec = JobSpec.model_validate({"model": {"dtype": "bfloat16"}})
    backend = TorchBackend(spec, path, path)
    assert next(backend.model.parameters()).dtype == torch.float32  # masters
    assert next(backend.ref.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        for p in backend.model.parameters():
            p.add_(1e-3 * torch.randn_like(p))  # not representable in bf16
    masters = {k: v.clone() for k, v in backend.model.state_dict().items()}
    info = write_snapshot(tmp_path, 1, backend.save_weights)
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(Path(info.path) / "model.safetensors")).values())
    (tmp_path / "ckpt").mkdir()
    backend.save_state(tmp_path / "ckpt")
    fresh = TorchBackend(spec, path, path)
    fresh.load_weights(Path(info.path))
    assert not all(torch.equal(fresh.model.state_dict()[k], masters[k]) for k in masters)  # bf16-rounded
    fresh.load_state(tmp_path / "ckpt")
    assert all(torch.equal(fresh.model.state_dict()[k], masters[k]) for k in masters)  # exact after the checkpoint


def test_hf_engine_reloads_a_verified_snapshot_and_keeps_its_weights_on_a_corrupt_one(tmp_path) -> None:
    from asyncrlhf.engines.hf import HFEngine
    from asyncrlhf.models import load_causal_lm, resolve_model

    path = resolve_model("builtin:tiny-sort")
    engine = HFEngine(JobSpec.model_validate({"generator": {"engine": "hf"}}), path)
    trained = load_causal_lm(path)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    good = write_snapshot(tmp_path, 1, lambda d: save_snapshot_files(trained, d, "float32"))
    engine.reload(good.path, good.checksum)
    assert all(torch.equal(engine.model.state_dict()[k], v) for k, v in trained.state_dict().items())
    assert engine.generate([[1, 5, 6]], 2, [0])[0][0].token_ids  # generates with the loaded weights
    bad = write_snapshot(tmp_path, 2, lambda d: save_snapshot_files(load_causal_lm(path), d, "float32"))
    data = bytearray((Path(bad.path) / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (Path(bad.path) / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(SnapshotError):
        engine.reload(bad.path, bad.checksum)
    assert all(torch.equal(engine.model.state_dict()[k], v) for k, v in trained.state_dict().items())
