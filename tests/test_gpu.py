"""The GPU paths for real (marked `gpu`, skipped without CUDA): the torch learner on cuda with bf16
autocast, the HF engine and a reward/feature model on the generator's GPU, a snapshot published in
bf16 and reloaded verified on the GPU. scripts/gpu-smoke.sh runs these and the end-to-end jobs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from asyncrlhf.api import JobSpec

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (scripts/gpu-smoke.sh)")]


def tiny() -> str:
    from asyncrlhf.models import resolve_model

    return resolve_model("builtin:tiny-sort")


def test_torch_learner_trains_on_the_gpu_in_bf16(tmp_path) -> None:
    from asyncrlhf.backends import to_batch
    from asyncrlhf.backends.torch_backend import TorchBackend
    from asyncrlhf.messages import Completion, RolloutGroup
    from asyncrlhf.snapshots import write_snapshot

    spec = JobSpec.model_validate({"model": {"dtype": "bfloat16"}, "learner": {"gpusPerNode": 1, "promptsPerStep": 2},
                                   "algorithm": {"samplesPerPrompt": 2}})
    backend = TorchBackend(spec, tiny(), tiny())
    assert backend.device.type == "cuda" and next(backend.model.parameters()).is_cuda
    assert next(backend.ref.parameters()).device.type == "cuda"
    groups = [RolloutGroup(id=f"r{i}", prompt_id=f"p{i}", batch=0, index=i, prompt_text="", prompt_token_ids=[1, 5, 6],
                           completions=[Completion(text="", token_ids=[7, 2], logprobs=[-1.0, -1.0], eos=True,
                                                   score=float(j)) for j in range(2)],
                           policy_version=0, generator_id="t") for i in range(2)]
    before = {k: v.clone() for k, v in backend.model.state_dict().items()}
    metrics = backend.train_step(to_batch(groups, backend.pad_id), 0)
    assert metrics["skipped_updates"] == 0.0
    assert any(not torch.equal(before[k], v) for k, v in backend.model.state_dict().items())
    assert torch.cuda.max_memory_allocated() > 0
    info = write_snapshot(tmp_path, 1, backend.save_weights)
    from safetensors.torch import load_file

    assert all(t.dtype == torch.bfloat16 for t in load_file(str(Path(info.path) / "model.safetensors")).values())


def test_hf_engine_and_feature_model_on_the_generators_gpu(tmp_path) -> None:
    from asyncrlhf.backends.weights import save_snapshot_files
    from asyncrlhf.engines.hf import HFEngine
    from asyncrlhf.models import load_causal_lm
    from asyncrlhf.rewards import FeatureModel
    from asyncrlhf.snapshots import write_snapshot

    spec = JobSpec.model_validate({"model": {"dtype": "bfloat16"}, "generator": {"engine": "hf", "resources": {"gpus": 1}}})
    engine = HFEngine(spec, tiny())
    assert engine.device.type == "cuda"
    samples = engine.generate([[1, 5, 6, 7]], 3, [0])
    assert len(samples[0]) == 3 and all(len(s.logprobs) == len(s.token_ids) for s in samples[0])
    info = write_snapshot(tmp_path, 1, lambda d: save_snapshot_files(load_causal_lm(tiny()), d, "bfloat16"))
    engine.reload(info.path, info.checksum)
    features = FeatureModel(tiny(), "bfloat16", device="cuda:0", micro_batch=2)
    phi = features.features(["3 1 2 ="] * 5, ["1 2 3"] * 5)
    assert phi.shape == (5, features.dim)
