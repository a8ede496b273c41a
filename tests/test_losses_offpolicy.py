"""The off-policy switches (algorithm.oldLogprobs, dualClip, importanceCap, valueHead), c_KL = β and the
topP guard, each against hand-computed values (docs/algorithms.md § Off-policy switches)."""

from __future__ import annotations

import dataclasses
import math
import random
import warnings

import pytest
import torch

from asyncrlhf.api import AlgorithmSpec, JobSpec
from asyncrlhf.losses import LossBatch, LossParams, Normalizer, dual_clip, get_loss, truncated_importance_weights

from test_crd import cel_failures, manifest, pydantic_error, schema_errors

LN = math.log


def run(name: str, batch: LossBatch, p: LossParams):
    loss_fn = get_loss(name)
    frozen = dataclasses.replace(batch, logprobs=None, values=None)
    with torch.no_grad():
        prepared = loss_fn.prepare(frozen, p)
    return loss_fn(batch, prepared, p, Normalizer.of(batch))


def one_token_pair(ratios: tuple[float, float], scores=(1.0, 0.0)) -> LossBatch:
    """One prompt, K=2 one-token answers whose ratios pi/pi_old are `ratios` (log pi_old = 0)."""
    return LossBatch(
        logprobs=torch.tensor([[LN(ratios[0])], [LN(ratios[1])]], dtype=torch.float64).requires_grad_(),
        old_logprobs=torch.zeros(2, 1, dtype=torch.float64), ref_logprobs=torch.zeros(2, 1, dtype=torch.float64),
        mask=torch.ones(2, 1, dtype=torch.float64), scores=torch.tensor(scores, dtype=torch.float64), group_size=2,
    )


# --- dual clip ----------------------------------------------------------------------------------


def test_dual_clip_bounds_only_negative_advantages():
    terms = torch.tensor([5.0, 5.0, -1.1, 0.5])
    adv = torch.tensor([-1.0, 1.0, 1.0, -2.0])
    bounded, taken = dual_clip(terms, adv, 3.0)
    # A=-1: min(5, 3) = 3; A=+1: unchanged; A=-2: min(0.5, 6) = 0.5
    assert bounded.tolist() == pytest.approx([3.0, 5.0, -1.1, 0.5])
    assert taken.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert dual_clip(terms, adv, None)[0] is terms


def test_proximal_rloo_dual_clip_caps_a_runaway_negative_sample():
    # LOO advantages of scores (1, 0): A = (+1, -1); ratios 1.1 and 5, eps 0.2.
    # sample 0: max(-1.1, -clip(1.1)) = -1.1; sample 1: max(5, 1.2) = 5 -> loss (-1.1 + 5) / 2 = 1.95,
    # and d loss / d log pi(y1) = rho / 2 = 2.5: the one sample dominates the step.
    p = LossParams(kl_coef=0.0, clip_epsilon=0.2)
    batch = one_token_pair((1.1, 5.0))
    loss, metrics = run("proximal-rloo", batch, p)
    loss.backward()
    assert loss.item() == pytest.approx(1.95)
    assert batch.logprobs.grad[1, 0].item() == pytest.approx(2.5)
    assert "dual_clip_frac" not in metrics
    # dual clip c = 3: sample 1 contributes min(5, 3) = 3 -> loss (-1.1 + 3) / 2 = 0.95, and no gradient
    batch = one_token_pair((1.1, 5.0))
    loss, metrics = run("proximal-rloo", batch, dataclasses.replace(p, dual_clip=3.0))
    loss.backward()
    assert loss.item() == pytest.approx(0.95)
    assert batch.logprobs.grad[1, 0].item() == 0.0
    assert batch.logprobs.grad[0, 0].item() == pytest.approx(-1.1 / 2)
    assert metrics["dual_clip_frac"] == pytest.approx(0.5)


def test_grpo_dual_clip_per_token():
    # group-normalised advantages of (1, 0): +-0.5 / (std 0.7071 + 1e-4); one token each, c_KL 0
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    p = LossParams(kl_coef=0.0, clip_epsilon=0.2, dual_clip=3.0)
    loss, metrics = run("grpo", one_token_pair((1.1, 5.0)), p)
    # token 0: max(-1.1a, -1.1a); token 1: min(max(5a, 1.2a), 3a) = 3a; mean over 2 tokens
    assert loss.item() == pytest.approx((-1.1 * a + 3 * a) / 2)
    assert metrics["dual_clip_frac"] == pytest.approx(0.5)


# --- truncated importance weights (oldLogprobs: learner) -----------------------------------------


def learner_batch() -> LossBatch:
    """Two answers of two tokens: pi_old (learner) / pi_behaviour = 2 and 10 per sequence."""
    behaviour = torch.tensor([[-1.0, -1.0], [-2.0, -1.0]], dtype=torch.float64)
    old = behaviour + torch.tensor([[LN(2.0), 0.0], [LN(2.0), LN(5.0)]], dtype=torch.float64)
    return LossBatch(
        logprobs=torch.tensor([[-0.5, -0.5], [-1.0, -1.0]], dtype=torch.float64).requires_grad_(),
        old_logprobs=old, ref_logprobs=old.clone(), mask=torch.ones(2, 2, dtype=torch.float64),
        scores=torch.tensor([1.0, 0.0], dtype=torch.float64), group_size=2, behaviour_logprobs=behaviour,
    )


def test_truncated_weights_per_sequence_and_per_token():
    batch, p = learner_batch(), LossParams(importance_cap=4.0)
    assert truncated_importance_weights(batch, p, per_token=False).tolist() == pytest.approx([2.0, 4.0])  # 10 -> 4
    per_token = truncated_importance_weights(batch, p, per_token=True).flatten().tolist()
    assert per_token == pytest.approx([2.0, 1.0, 2.0, 4.0])  # 5 -> 4
    assert truncated_importance_weights(batch, LossParams(), per_token=False) is None  # no cap: no correction
    assert truncated_importance_weights(dataclasses.replace(batch, behaviour_logprobs=None), p, False) is None


def test_rloo_weights_each_sequence_by_the_truncated_ratio():
    # c_KL 0: A = (+1, -1); log pi(y) = -1 and -2; weights 2 and min(10, 4) = 4
    # loss = [-(2)(1)(-1) - (4)(-1)(-2)] / 2 = (2 - 8) / 2 = -3
    loss, metrics = run("rloo", learner_batch(), LossParams(kl_coef=0.0, importance_cap=4.0))
    assert loss.item() == pytest.approx(-3.0)
    assert metrics["is_weight_mean"] == pytest.approx(3.0)
    unweighted, _ = run("rloo", learner_batch(), LossParams(kl_coef=0.0))
    assert unweighted.item() == pytest.approx((1.0 - 2.0) / 2)  # -(1)(-1) - (-1)(-2) = 1 - 2


def test_proximal_rloo_weight_multiplies_the_clipped_term():
    # rho = pi / pi_old(learner): row 0 exp(-1 - (ln2 - 2)) = e/2 = 1.359 -> clipped to 1.2 for A=+1: -1.2;
    # row 1 exp(-2 - (ln10 - 3)) = e/10 = 0.2718, A=-1: max(0.2718, 0.8) = 0.8. Weights 2 and 4.
    loss, _ = run("proximal-rloo", learner_batch(), LossParams(kl_coef=0.0, importance_cap=4.0))
    assert loss.item() == pytest.approx((2 * -1.2 + 4 * 0.8) / 2)


# --- c_KL = β ---------------------------------------------------------------------------------


def test_kl_coefficient_is_beta_and_follows_its_schedule():
    algo = AlgorithmSpec(loss="rloo", beta=0.2, beta_schedule={"final": 0.1, "steps": 10})
    assert LossParams.from_spec(algo, 0).kl_coef == pytest.approx(0.2)
    assert LossParams.from_spec(algo, 5).kl_coef == pytest.approx(0.15)
    assert LossParams.from_spec(algo, 5).beta == pytest.approx(0.15)


def test_deprecated_kl_coef_still_applies_with_a_warning():
    with pytest.warns(FutureWarning, match="klCoef is deprecated.*move it to beta"):
        algo = AlgorithmSpec.model_validate({"loss": "ppo", "klCoef": 0.05})
    p = LossParams.from_spec(algo, 0)
    assert (p.kl_coef, p.beta) == (0.05, 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AlgorithmSpec.model_validate({"loss": "ppo", "beta": 0.05})  # the new way: no warning


# --- spec rules: pydantic and CEL agree ---------------------------------------------------------

RULES = [
    ("learner pi_old for ppo", {"algorithm": {"loss": "ppo", "oldLogprobs": "learner"}}, None),
    ("learner pi_old for dpo", {"algorithm": {"oldLogprobs": "learner"}}, ".algorithm.oldLogprobs"),
    ("dual clip for proximal rloo", {"algorithm": {"loss": "proximal-rloo", "dualClip": 3}}, None),
    ("dual clip for rloo", {"algorithm": {"loss": "rloo", "dualClip": 3}}, ".algorithm.dualClip"),
    ("cap with learner", {"algorithm": {"loss": "rloo", "oldLogprobs": "learner", "importanceCap": 2}}, None),
    ("cap with behaviour", {"algorithm": {"loss": "rloo", "importanceCap": 2}}, ".algorithm.importanceCap"),
    ("detached value head ppo", {"algorithm": {"loss": "ppo", "valueHead": "detached"}}, None),
    ("detached value head grpo", {"algorithm": {"loss": "grpo", "valueHead": "detached"}}, ".algorithm.valueHead"),
    ("topP with behaviour ppo", {"algorithm": {"loss": "ppo"}, "generator": {"sampling": {"topP": 0.9}}},
     ".generator.sampling.topP"),
    ("topP with learner ppo", {"algorithm": {"loss": "ppo", "oldLogprobs": "learner"},
                               "generator": {"sampling": {"topP": 0.9}}}, None),
    ("topP with learner + cap", {"algorithm": {"loss": "ppo", "oldLogprobs": "learner", "importanceCap": 2},
                                 "generator": {"sampling": {"topP": 0.9}}}, ".generator.sampling.topP"),
    ("topP with dpo", {"generator": {"sampling": {"topP": 0.9}}}, None),
]


@pytest.mark.parametrize("case,spec,field", RULES, ids=[c for c, _, _ in RULES])
def test_off_policy_rules_agree_in_cel_and_pydantic(case, spec, field):
    job = manifest(**spec)
    assert schema_errors(job) == []
    assert cel_failures(job) == ([field] if field else [])
    error = pydantic_error(job)
    assert (error is None) == (field is None), error
    if field:
        assert "set" in error or "leave" in error  # says what to do


# --- the backend: pi_old recomputed, the detached value head ---------------------------------------


@pytest.fixture(scope="module")
def tiny_path():
    from asyncrlhf.models import resolve_model

    return resolve_model("builtin:tiny-sort")


def backend_for(path: str, **algorithm):
    from asyncrlhf.backends.torch_backend import TorchBackend

    spec = JobSpec.model_validate({"algorithm": {"samplesPerPrompt": 2, **algorithm},
                                   "learner": {"promptsPerStep": 2, "microBatchSize": 2,
                                               "optimizer": {"lr": 1e-3, "maxGradNorm": 1.0}}})
    torch.manual_seed(0)
    return TorchBackend(spec, path, path)


def tiny_batch(backend, shift: float):
    """Two prompts x 2 answers; behaviour log-probs = the learner's own minus `shift` per token."""
    from asyncrlhf.backends.base import Batch
    from asyncrlhf.logprobs import pack

    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(4, 14) for _ in range(3)] + [14] for _ in range(2) for _ in range(2)]
    responses = [[rng.randrange(4, 14) for _ in range(n)] + [2] for n in (2, 3, 1, 2)]
    _, _, mask = pack(prompts, responses, backend.pad_id)
    batch = Batch(prompts, responses, torch.zeros_like(mask), mask, torch.tensor([1.0, 0.0, 0.5, 0.25]),
                  torch.ones(4), 2)
    with torch.no_grad():
        own = backend._forward(batch, slice(0, 4), False)[0]
    return dataclasses.replace(batch, old_logprobs=(own - shift) * mask)


def test_learner_old_logprobs_make_the_first_ratio_one_and_weight_by_the_cap(tiny_path):
    # behaviour = learner - 0.1 per token: in behaviour mode the ratio pi/pi_old is exp(0.1 x tokens) > 1;
    # recomputed by the learner it is exactly 1, and the importance weight is min(exp(0.1 x tokens), cap)
    behaviour = backend_for(tiny_path, loss="proximal-rloo")
    batch = tiny_batch(behaviour, 0.1)
    tokens = batch.mask.sum(-1)
    ratio = behaviour.train_step(batch, 0)["ratio_mean"]
    assert ratio == pytest.approx(torch.exp(0.1 * tokens).mean().item(), rel=1e-4)
    learner = backend_for(tiny_path, loss="proximal-rloo", oldLogprobs="learner", importanceCap=1.3)
    metrics = learner.train_step(tiny_batch(learner, 0.1), 0)
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["is_weight_mean"] == pytest.approx(torch.exp(0.1 * tokens).clamp(max=1.3).mean().item(),
                                                      rel=1e-4)


def trunk_gradient(backend, batch, vf_coef: float) -> torch.Tensor:
    inputs = backend._step_inputs(batch, 0)
    inputs = dataclasses.replace(inputs, params=dataclasses.replace(inputs.params, vf_coef=vf_coef))
    backend.model.zero_grad(set_to_none=True)
    loss, _ = backend._micro_loss(batch, slice(0, 4), inputs)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in backend.model.model.layers.parameters()])


@pytest.mark.parametrize("value_head,trunk_moves", [("shared", True), ("detached", False)])
def test_value_loss_reaches_the_trunk_only_with_a_shared_head(tiny_path, value_head, trunk_moves):
    backend = backend_for(tiny_path, loss="ppo", valueHead=value_head)
    torch.nn.init.normal_(backend.value_head.weight)  # a non-zero head, so the value loss has a gradient
    batch = tiny_batch(backend, 0.0)
    without, with_values = trunk_gradient(backend, batch, 0.0), trunk_gradient(backend, batch, 1.0)
    assert bool((without - with_values).abs().max() > 1e-6) == trunk_moves


@pytest.mark.parametrize("name", ["rloo", "proximal-rloo", "grpo", "ppo"])
def test_switches_keep_micro_batches_summing_to_the_full_batch(name):
    from test_losses import random_batch

    batch = random_batch(seed=5)
    noise = torch.randn(batch.old_logprobs.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    batch = dataclasses.replace(batch, behaviour_logprobs=batch.old_logprobs - 0.5 * noise.abs())
    p = LossParams(kl_coef=0.1, clip_epsilon=0.1, dual_clip=1.5, importance_cap=1.3)
    loss_fn = get_loss(name)
    with torch.no_grad():
        prepared = loss_fn.prepare(dataclasses.replace(batch, logprobs=None, values=None), p)
    assert "is_weight" in prepared and float(prepared["is_weight"].max()) == pytest.approx(1.3)  # the cap binds
    norm = Normalizer.of(batch)
    full, full_metrics = loss_fn(batch, prepared, p, norm)
    k, parts = batch.group_size, []
    for rows in (slice(0, k), slice(k, batch.rows)):
        pick = {f: getattr(batch, f)[rows] for f in ("logprobs", "old_logprobs", "ref_logprobs", "mask", "scores",
                                                    "values", "old_values", "behaviour_logprobs")}
        micro = LossBatch(group_size=k, **pick)
        parts.append(loss_fn(micro, {n: t[rows] for n, t in prepared.items()}, p, norm))
    torch.testing.assert_close(sum(loss for loss, _ in parts), full)
    for key in ("is_weight_mean", "dual_clip_frac"):
        if key in full_metrics:
            assert sum(m[key] for _, m in parts) == pytest.approx(full_metrics[key], abs=1e-9)
