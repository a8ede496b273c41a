"""A training step whose loss is not finite is skipped: weights never take a NaN or an Inf."""

from __future__ import annotations

import math

import torch

from asyncrlhf.api import JobSpec
from asyncrlhf.backends import make_backend
from asyncrlhf.backends.base import Batch
from asyncrlhf.logprobs import pack
from asyncrlhf.models import resolve_model


def batch(score_of_first: float) -> Batch:
    prompts = [[1, 5, 6, 14]] * 4
    responses = [[5, 6, 2], [6, 5, 2], [5, 5, 2], [6, 6, 2]]
    _, _, mask = pack(prompts, responses, 0)
    old = torch.zeros_like(mask)
    old[mask.bool()] = -1.0
    scores = torch.tensor([score_of_first, 1.0, 0.0, 0.5])
    return Batch(prompts, responses, old, mask, scores, torch.ones(4, dtype=torch.bool), 4)


def test_a_nan_score_skips_the_update_and_a_finite_one_trains():
    spec = JobSpec.model_validate({"algorithm": {"loss": "rloo", "samplesPerPrompt": 4},
                                   "learner": {"promptsPerStep": 1}})
    path = resolve_model(spec.model.policy)
    backend = make_backend(spec, path, path)
    before = {k: v.clone() for k, v in backend.model.state_dict().items()}

    metrics = backend.train_step(batch(float("nan")), 0)
    assert metrics["skipped_updates"] == 1.0 and not math.isfinite(metrics["grad_norm"])
    after = backend.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # untouched, and finite
    assert all(bool(torch.isfinite(v).all()) for v in after.values())

    metrics = backend.train_step(batch(0.25), 1)
    assert metrics["skipped_updates"] == 0.0 and math.isfinite(metrics["grad_norm"])
    assert any(not torch.equal(before[k], backend.model.state_dict()[k]) for k in before)
