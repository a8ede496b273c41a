"""The HF engine's batched sampling: the learner's log-probs, per-prompt seeds, vLLM's top-p."""

from __future__ import annotations

import math

import pytest
import torch

from asyncrlhf.api import JobSpec
from asyncrlhf.engines.hf import HFEngine
from asyncrlhf.engines.hf_sampling import left_pad, nucleus
from asyncrlhf.logprobs import sequence_token_logprobs
from asyncrlhf.models import resolve_model


@pytest.fixture(scope="module")
def engine() -> HFEngine:
    spec = JobSpec.model_validate({"generator": {"engine": "hf", "sampling": {"maxTokens": 6, "temperature": 0.7}}})
    return HFEngine(spec, resolve_model("builtin:tiny-sort"))


PROMPTS = [[1, 5, 6, 7], [1, 9, 4], [1, 8, 8, 3, 2, 6]]  # different lengths: left padding is exercised


def test_logprobs_are_the_learners_for_the_sampled_tokens(engine):
    groups = engine.generate(PROMPTS, 3, [11, 12, 13])
    for prompt, group in zip(PROMPTS, groups):
        assert len(group) == 3
        responses = [s.token_ids for s in group]
        expected = sequence_token_logprobs(engine.model, [prompt] * 3, responses, 0.7, engine.sampling_args.pad_id)
        for sample, want in zip(group, expected):
            assert len(sample.logprobs) == len(sample.token_ids) == len(want)
            assert sample.logprobs == pytest.approx(want, abs=2e-5)
            eos = engine.sampling_args.eos_ids
            assert sample.eos == (sample.token_ids[-1] in eos)
            assert not any(t in eos for t in sample.token_ids[:-1])  # cut at the first EOS


def test_a_prompts_samples_depend_on_its_seed_not_on_its_batch(engine):
    alone = engine.generate([PROMPTS[1]], 4, [7])[0]
    with_others = engine.generate([PROMPTS[2], PROMPTS[1], PROMPTS[0]], 4, [1, 7, 2])[1]
    assert [s.token_ids for s in alone] == [s.token_ids for s in with_others]
    other_seed = engine.generate([PROMPTS[1]], 4, [8])[0]
    assert [s.token_ids for s in alone] != [s.token_ids for s in other_seed]


def test_prompts_split_over_several_decode_loops_give_the_same_samples(engine, monkeypatch):
    import asyncrlhf.engines.hf as hf

    together = engine.generate(PROMPTS, 2, [4, 5, 6])
    monkeypatch.setattr(hf, "MAX_ROWS", 2)  # one prompt per loop
    apart = engine.generate(PROMPTS, 2, [4, 5, 6])
    assert [[s.token_ids for s in g] for g in together] == [[s.token_ids for s in g] for g in apart]


def test_nucleus_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = nucleus(logits, 0.7).isfinite().tolist()[0]
    assert kept == [True, True, False, False]  # 0.5 < 0.7 <= 0.5 + 0.3
    assert nucleus(logits, 0.1).isfinite().tolist()[0] == [True, False, False, False]  # the top token stays
    assert torch.equal(nucleus(logits, 1.0), logits)
    probs = nucleus(logits, 0.7).softmax(-1)[0].tolist()
    assert probs[:2] == pytest.approx([0.5 / 0.8, 0.3 / 0.8]) and probs[2:] == [0.0, 0.0]


def test_left_pad_puts_tokens_at_the_right_end():
    ids, attn = left_pad([[4, 5], [6]], 0, "cpu")
    assert ids.tolist() == [[4, 5], [0, 6]] and attn.tolist() == [[1, 1], [0, 1]]


def test_sampling_follows_the_tempered_distribution(engine):
    """Over many samples the first token's frequencies match softmax(logits / T) (chi-square bound)."""
    prompt, n = PROMPTS[0], 400
    first = [g.token_ids[0] for g in engine.generate([prompt], n, [3])[0]]
    with torch.no_grad():
        logits = engine.model(input_ids=torch.tensor([prompt])).logits[0, -1].float() / 0.7
    probs = logits.softmax(-1)
    top = probs.topk(3).indices.tolist()
    chi2 = sum((first.count(t) - n * probs[t].item()) ** 2 / (n * probs[t].item()) for t in top)
    assert chi2 < 16.3, chi2  # 3 degrees of freedom, p = 0.001: a wrong distribution fails, noise does not
    assert not math.isnan(chi2)
