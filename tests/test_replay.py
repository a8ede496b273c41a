"""The TBA replay buffer: storage rules, sampling frequencies, determinism, persistence."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest
import torch

from asyncrlhf.replay import ReplayBuffer, ReplayItem, replay_enabled

# Upper 0.1% points of the chi-square distribution (standard tables). The tests are seeded, so each
# either always passes or always fails; a correct sampler fails a given seed with probability 0.001.
CHI2_999 = {4: 18.467, 9: 27.877}


def item(prompt, tokens, score=0.0, version=0, payload=None) -> ReplayItem:
    return ReplayItem(prompt_id=prompt, tokens=tuple(tokens), score=score, policy_version=version,
                      payload=payload)


def chi_square(counts: Counter, probs: dict, n: int) -> float:
    return sum((counts.get(key, 0) - n * p) ** 2 / (n * p) for key, p in probs.items())


def buffer_with_old_and_recent(m: float, sampling: str = "uniform") -> ReplayBuffer:
    """Prompt 'p': 6 items before the sync (tokens (0,)..(5,)), 4 after ((6,)..(9,))."""
    buf = ReplayBuffer(capacity=100, recency_probability=m, sampling=sampling)
    buf.extend([item("p", [i], score=i / 4) for i in range(6)])
    buf.mark_sync()
    buf.extend([item("p", [i], score=i / 4) for i in range(6, 10)])
    return buf


def draw_counts(buf: ReplayBuffer, n: int, rng) -> Counter:
    return Counter(group[0].tokens[0] for group in buf.sample(["p"] * n, k=1, rng=rng))


# ---------------------------------------------------------------------------------------------
# Storage


def test_duplicates_are_stored_once_and_the_newer_copy_wins():
    buf = ReplayBuffer(capacity=10, recency_probability=0.5)
    assert buf.add(item("a", [1, 2], score=0.1, version=0))
    assert buf.add(item("b", [1, 2], score=0.3))  # same tokens, other prompt: distinct
    buf.mark_sync()
    assert not buf.add(item("a", [1, 2], score=0.2, version=3))
    assert len(buf) == 2
    (stored,) = buf.items("a")
    assert (stored.score, stored.policy_version) == (0.2, 3)
    assert buf.recent("a") == [stored]  # re-added after the sync: counts as recent


def test_capacity_evicts_the_oldest_first():
    buf = ReplayBuffer(capacity=3, recency_probability=0.5)
    buf.extend([item("a", [1]), item("b", [1]), item("a", [2])])
    buf.add(item("a", [1]))  # refreshed: now the youngest, so ("b", 1) is the oldest
    buf.add(item("c", [1]))
    assert len(buf) == 3
    assert buf.prompts() == ["a", "c"]
    assert [i.tokens for i in buf.items("a")] == [(2,), (1,)]


def test_fewer_items_than_k_draws_with_replacement_else_without():
    buf = ReplayBuffer(capacity=10, recency_probability=0.0)
    buf.extend([item("a", [i]) for i in range(3)] + [item("b", [i]) for i in range(8)])
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        few, many = buf.sample(["a", "b"], k=5, rng=gen)
        assert len(few) == 5 and {i.tokens for i in few} <= {(0,), (1,), (2,)}
        assert len({i.tokens for i in many}) == 5  # distinct


@pytest.mark.parametrize("rng_factory", [lambda: torch.Generator().manual_seed(7), lambda: random.Random(7)])
def test_sampling_is_deterministic_given_the_seed(rng_factory):
    buf = buffer_with_old_and_recent(0.5, "reward")
    tokens = lambda groups: [[i.tokens for i in g] for g in groups]  # noqa: E731
    first = tokens(buf.sample(["p"] * 5, k=3, rng=rng_factory()))
    assert first == tokens(buf.sample(["p"] * 5, k=3, rng=rng_factory()))


def test_sampling_n_prompts_picks_distinct_stored_prompts():
    buf = ReplayBuffer(capacity=100, recency_probability=0.5)
    buf.extend([item(p, [t]) for p in range(6) for t in range(3)])
    groups = buf.sample(n_prompts=4, k=2, rng=random.Random(0))
    prompts = [g[0].prompt_id for g in groups]
    assert len(set(prompts)) == 4 and all(len({i.prompt_id for i in g}) == 1 for g in groups)
    with pytest.raises(ValueError, match="holds 6"):
        buf.sample(n_prompts=7, k=2)


def test_unknown_prompt_and_bad_settings_are_reported():
    buf = ReplayBuffer(capacity=5, recency_probability=0.5)
    with pytest.raises(KeyError, match="nope"):
        buf.sample(["nope"], k=1)
    with pytest.raises(ValueError, match="sampling"):
        ReplayBuffer(capacity=5, recency_probability=0.5, sampling="greedy")


def test_enabled_by_default_only_for_tb():
    from asyncrlhf.api import ReplayBufferSpec

    assert replay_enabled(ReplayBufferSpec(), "tb")
    assert not replay_enabled(ReplayBufferSpec(), "online-dpo")
    assert replay_enabled(ReplayBufferSpec(enabled=True), "rloo")
    assert not replay_enabled(ReplayBufferSpec(enabled=False), "tb")


# ---------------------------------------------------------------------------------------------
# Frequencies (chi-square goodness of fit, 10,000 seeded draws of K=1)


@pytest.mark.parametrize("rng", [torch.Generator().manual_seed(1), random.Random(1)], ids=["torch", "random"])
def test_recent_items_are_drawn_with_probability_m(rng):
    m, n = 0.7, 10_000
    counts = draw_counts(buffer_with_old_and_recent(m), n, rng)
    # recent item (4 of them): m/4 + (1-m)/10; older item (6): (1-m)/10
    probs = {i: (m / 4 if i >= 6 else 0.0) + (1 - m) / 10 for i in range(10)}
    assert chi_square(counts, probs, n) < CHI2_999[9]
    # power: the same counts are far from what ignoring m (uniform over all 10) would give
    assert chi_square(counts, {i: 0.1 for i in range(10)}, n) > 10 * CHI2_999[9]


def test_reward_sampling_follows_softmax_of_scores():
    buf = ReplayBuffer(capacity=10, recency_probability=0.0, sampling="reward")
    scores = [0.0, 1.0, 2.0, -1.0, 0.5]
    buf.extend([item("p", [i], score=s) for i, s in enumerate(scores)])
    n = 10_000
    counts = draw_counts(buf, n, torch.Generator().manual_seed(2))
    z = sum(math.exp(s) for s in scores)
    probs = {i: math.exp(s) / z for i, s in enumerate(scores)}
    assert chi_square(counts, probs, n) < CHI2_999[4]
    assert chi_square(counts, {i: 0.2 for i in range(5)}, n) > 10 * CHI2_999[4]


def test_reward_sampling_mixes_recent_uniform_and_softmax_over_everything():
    m, n = 0.5, 10_000
    counts = draw_counts(buffer_with_old_and_recent(m, "reward"), n, torch.Generator().manual_seed(3))
    z = sum(math.exp(i / 4) for i in range(10))
    probs = {i: (m / 4 if i >= 6 else 0.0) + (1 - m) * math.exp(i / 4) / z for i in range(10)}
    assert chi_square(counts, probs, n) < CHI2_999[9]


def test_recency_mode_only_draws_recent_items_and_falls_back_when_there_are_none():
    buf = buffer_with_old_and_recent(0.0, "recency")
    counts = draw_counts(buf, 2000, random.Random(4))
    assert set(counts) == {6, 7, 8, 9}
    buf.mark_sync()  # nothing recent yet: the whole prompt is the pool
    assert set(draw_counts(buf, 2000, random.Random(4))) == set(range(10))


# ---------------------------------------------------------------------------------------------
# Persistence


def test_state_survives_a_json_round_trip_and_sampling_continues_identically():
    buf = ReplayBuffer(capacity=8, recency_probability=0.6, sampling="reward")
    buf.extend([item("a", [1, 2], 0.5, 1, payload={"text": "12"}), item(3, [4], -1.0, 1)])
    buf.mark_sync()
    buf.extend([item("a", [2, 1], 1.5, 2), item(3, [5], 0.0, 2)])
    buf.items("a")[0].payload = {"text": "12", "logprobs": [-0.25, -1.5]}

    state = json.loads(json.dumps(buf.state_dict()))
    restored = ReplayBuffer(capacity=8, recency_probability=0.6, sampling="reward")
    restored.load_state_dict(state)

    assert restored.state_dict() == buf.state_dict()
    assert restored.prompts() == ["a", 3]  # int ids stay ints
    draw = lambda b: [[(i.prompt_id, i.tokens) for i in g]  # noqa: E731
                      for g in b.sample(n_prompts=2, k=3, rng=random.Random(9))]
    assert draw(restored) == draw(buf)
    restored.add(item("a", [9], 0.0, 3))  # insertion order continues after the restore
    assert restored.items("a")[-1].seq == 4


def test_state_from_a_build_with_the_retired_logprob_fields_still_loads():
    buf = ReplayBuffer(capacity=4, recency_probability=0.5)
    buf.add(item("a", [1, 2], 0.5, 1))
    state = buf.state_dict()
    state["prompts"][0]["items"][0].update(old_logprobs=None, ref_logprobs=None)  # as they were written
    restored = ReplayBuffer(capacity=4, recency_probability=0.5)
    restored.load_state_dict(state)
    assert restored.state_dict() == buf.state_dict()


def test_a_smaller_capacity_after_restart_evicts_the_oldest():
    buf = ReplayBuffer(capacity=5, recency_probability=0.5)
    buf.extend([item("a", [i]) for i in range(5)])
    small = ReplayBuffer(capacity=2, recency_probability=0.5)
    small.load_state_dict(buf.state_dict())
    assert [i.tokens for i in small.items("a")] == [(3,), (4,)]
