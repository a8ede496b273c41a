"""Rule verifiers, and the one-pass head learning from preferences over the tiny model's real features.

The python, http and sum rewards and their failures: tests/test_reward_kinds.py."""

from __future__ import annotations

import random

import numpy as np
import pytest

from asyncrlhf.api import JobSpec
from asyncrlhf.messages import Preference
from asyncrlhf.reward_kinds import RewardBatch, make_reward, score_batch
from asyncrlhf.rewards import DeploymentAdapter, FeatureModel, HeadLearner, OnePassScorer
from asyncrlhf.tasks import gsm8k_reward, sort_digits_prompt, sort_digits_reward

ONEPASS = {"task": {"reward": {"kind": "onepass", "onepass": {"lambda": 1.0, "bound": 20.0}}}}


@pytest.mark.parametrize("response, answer, expected", [
    ("1 2 3", "1 2 3", 1.0),
    ("3 2 1", "1 2 3", 1 / 3),      # the middle one is right
    ("1 2", "1 2 3", 2 / 3),        # a missing digit counts as wrong
    ("1 2 3 4", "1 2 3", 3 / 4),    # so does an extra one
    ("", "1 2 3", 0.0),
])
def test_sort_digits_reward(response, answer, expected):
    assert sort_digits_reward("", response, answer) == pytest.approx(expected)


@pytest.mark.parametrize("response, answer, expected", [
    ("so 3 + 4 = 7. The answer is 7", "#### 7", 1.0),
    ("1,000", "1000", 1.0),
    ("it is 8", "#### 7", 0.0),
    ("no number", "7", 0.0),
])
def test_gsm8k_reward(response, answer, expected):
    assert gsm8k_reward("", response, answer) == expected


def test_the_sort_digits_rule_is_the_default():
    reward = make_reward(JobSpec())
    assert reward.name == "rule reward 'sort-digits'"
    assert score_batch(reward, RewardBatch(["2 1 ="], ["1 2"], {"answer": ["1 2"]})) == [1.0]


def labelled_pairs(n: int, seed: int):
    """Preferences of a 'user' who likes sorted answers: the higher sort-digits reward wins."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        rec = sort_digits_prompt(rng)
        digits = rec.text.split()[:-1]
        a, b = " ".join(sorted(digits)), " ".join(rng.sample(digits, len(digits)))
        ra, rb = sort_digits_reward(rec.text, a, rec.answer), sort_digits_reward(rec.text, b, rec.answer)
        if ra != rb:
            chosen, rejected = (a, b) if ra > rb else (b, a)
            out.append(Preference(id=str(len(out)), prompt=rec.text, chosen=chosen, rejected=rejected))
    return out


@pytest.fixture(scope="module")
def features():
    from asyncrlhf.models import resolve_model

    return FeatureModel(resolve_model("builtin:tiny-sort"))


def pairwise_accuracy(learner: HeadLearner, prefs) -> float:
    chosen = learner.features.features([p.prompt for p in prefs], [p.chosen for p in prefs])
    rejected = learner.features.features([p.prompt for p in prefs], [p.rejected for p in prefs])
    return float(np.mean((chosen - rejected) @ learner.head.theta > 0))


def test_features_are_unit_norm_and_deterministic(features):
    a = features.features(["3 1 2 ="], ["1 2 3"])
    assert a.shape == (1, features.dim)
    assert np.linalg.norm(a) == pytest.approx(1.0)
    assert np.array_equal(a, features.features(["3 1 2 ="], ["1 2 3"]))


def test_head_learns_the_users_preference_online(features):
    learner = HeadLearner(JobSpec.model_validate(ONEPASS), features)
    held_out = labelled_pairs(200, seed=1)
    assert pairwise_accuracy(learner, held_out) == 0.0  # θ = 0 prefers nothing
    learner.learn(labelled_pairs(400, seed=2))
    assert learner.head.updates == 400
    assert pairwise_accuracy(learner, held_out) >= 0.8


def test_generators_score_with_the_published_head(features):
    spec = JobSpec.model_validate(ONEPASS)
    learner = HeadLearner(spec, features)
    learner.learn(labelled_pairs(300, seed=3))
    scorer = OnePassScorer.__new__(OnePassScorer)  # share the loaded feature model
    scorer.features, scorer.theta, scorer.updates = features, np.zeros(features.dim), 0
    assert scorer.score(["3 1 2 ="], ["1 2 3"], [""]) == [0.0]
    scorer.set_head(learner.head_message())
    assert scorer.updates == 300
    held_out = labelled_pairs(100, seed=5)
    chosen = scorer.score([p.prompt for p in held_out], [p.chosen for p in held_out], [""] * 100)
    rejected = scorer.score([p.prompt for p in held_out], [p.rejected for p in held_out], [""] * 100)
    assert np.mean(np.array(chosen) > np.array(rejected)) >= 0.8


def test_deployment_adaptation_serves_better_answers_as_it_learns(features):
    """Serve (best, exploratory) of K candidates; the simulated user picks the better; learn."""
    adapter = DeploymentAdapter(HeadLearner(JobSpec.model_validate(ONEPASS), features))
    rng = random.Random(4)
    served = []
    for _ in range(300):
        rec = sort_digits_prompt(rng)
        digits = rec.text.split()[:-1]
        candidates = [" ".join(sorted(digits))] + [" ".join(rng.sample(digits, len(digits))) for _ in range(3)]
        rng.shuffle(candidates)
        best, explore = adapter.choose(rec.text, candidates)
        assert best != explore
        rewards = [sort_digits_reward(rec.text, candidates[i], rec.answer) for i in (best, explore)]
        average = np.mean([sort_digits_reward(rec.text, c, rec.answer) for c in candidates])
        served.append(rewards[0] - average)  # how much better than a random pick
        if rewards[0] != rewards[1]:
            win, lose = (best, explore) if rewards[0] > rewards[1] else (explore, best)
            adapter.feedback(rec.text, candidates[win], candidates[lose])
    # θ starts at 0 (the first pick is arbitrary); after a few hundred labels it beats chance clearly
    assert np.mean(served[-100:]) >= 0.2, np.mean(served[-100:])
