"""Staleness bookkeeping: what the learner releases, keeps, drops, and skips."""

from __future__ import annotations

import pytest

from asyncrlhf.learner import classify, release_range
from asyncrlhf.messages import RolloutGroup


@pytest.mark.parametrize("published, n, released, total, expected", [
    (0, 1, -1, 10, [0, 1]),      # start of the paper's loop: batches 0 and 1 with θ0
    (1, 1, 1, 10, [2]),          # after step 0: batch 2 may use θ1
    (0, 0, -1, 10, [0]),         # sync: one batch at a time
    (3, 0, 2, 10, [3]),
    (0, 4, -1, 3, [0, 1, 2]),    # never beyond the last step
    (5, 2, 7, 10, []),           # already released
    (4, 4, 7, 100, [8]),         # k=4: nothing between snapshots, then N ahead
])
def test_release_range(published, n, released, total, expected):
    assert list(release_range(published, n, released, total)) == expected


def rollout(batch: int, version: int, index: int = 0, rid: str = "r") -> RolloutGroup:
    return RolloutGroup(id=rid, prompt_id="p", batch=batch, index=index, prompt_text="", prompt_token_ids=[1],
                        completions=[], policy_version=version, generator_id="g")


@pytest.mark.parametrize("group, step, n, slot, verdict", [
    (rollout(5, 4), 5, 1, {}, "keep"),           # staleness 1 <= N
    (rollout(5, 5), 5, 0, {}, "keep"),           # on-policy
    (rollout(5, 3), 5, 1, {}, "stale"),          # 2 versions old
    (rollout(7, 6), 5, 1, {}, "keep"),           # a later batch: judged at the step that uses it
    (rollout(7, 5), 5, 1, {}, "stale"),
    (rollout(5, 4), 6, 1, {}, "duplicate"),      # trained on at step 5, redelivered after a restart
    (rollout(5, 4, index=2), 5, 1, {2: None}, "duplicate"),  # slot already filled
    (rollout(4, 4), 5, 1, {}, "duplicate"),      # its step is past
])
def test_classify(group, step, n, slot, verdict):
    assert classify(group, step, n, slot) == verdict


def test_release_plus_min_version_bounds_staleness_without_deadlock():
    """Simulate the protocol for N in 0..5 and k in 1..3: a batch is generated at the earliest with the
    snapshot published when it was released, and used at step b. Staleness stays <= N, and the batch
    a step needs has always been released (no deadlock)."""
    for n in range(6):
        for k in (1, 2, 3):
            if n < k - 1:
                continue  # rejected by the spec (api.CROSS_FIELD_RULES)
            published, released, generated_with = 0, -1, {}
            for step in range(40):
                for b in release_range(published, n, released, 40):
                    released = b
                    generated_with[b] = published
                assert released >= step, (n, k, step)
                assert step - generated_with[step] <= n, (n, k, step)
                if (step + 1) % k == 0:
                    published = step + 1
