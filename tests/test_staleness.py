"""Staleness bookkeeping: what the learner releases, keeps, drops, and skips."""

from __future__ import annotations

import pytest

from asyncrlhf.schedule import (
    RecordWindow, Verdict, classify, implausible, min_version, release_range, unreleased_from,
)


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


FRESH, STALE, TRAINED, DUPLICATE = Verdict.FRESH, Verdict.STALE, Verdict.TRAINED, Verdict.DUPLICATE


@pytest.mark.parametrize("batch, index, version, step, n, filled, verdict", [
    (5, 0, 4, 5, 1, set(), FRESH),           # staleness 1 <= N
    (5, 0, 5, 5, 0, set(), FRESH),           # on-policy
    (5, 0, 3, 5, 1, set(), STALE),           # 2 versions old
    (6, 0, 5, 5, 1, set(), FRESH),           # a later batch: judged at the step that uses it
    (7, 0, 5, 5, 1, set(), STALE),
    (5, 0, 4, 6, 1, set(), TRAINED),         # trained on at step 5, redelivered after a restart
    (5, 2, 4, 5, 1, {2}, DUPLICATE),         # slot already filled
    (4, 0, 4, 5, 1, set(), TRAINED),         # its step is past
    (4, 2, 4, 5, 1, {2}, TRAINED),           # past beats filled: it was trained on
    (5, 0, 9, 5, 1, set(), STALE),           # a version never published (published is 5 here)
    (5, 0, 10**9, 5, 1, set(), STALE),
])
def test_classify(batch, index, version, step, n, filled, verdict):
    assert classify(batch, index, version, step, n, filled, published=step) is verdict


@pytest.mark.parametrize("batch, index, expected", [
    (3, 7, ""), (3, 8, "index 8 is past learner.promptsPerStep (8)"),
    (99, 0, ""), (100, 0, "batch 100 is past learner.totalSteps (100)"), (10**8, 0, "batch 100000000 is past"),
])
def test_implausible_places_are_named(batch, index, expected):
    reason = implausible(batch, index, prompts_per_step=8, total_steps=100)
    assert reason.startswith(expected) and bool(reason) == bool(expected)


@pytest.mark.parametrize("batch, n, expected", [(0, 1, 0), (3, 1, 2), (3, 0, 3), (2, 4, 0), (10, 4, 6)])
def test_min_version_is_one_rule_for_first_and_later_releases(batch, n, expected):
    assert min_version(batch, n) == expected


@pytest.mark.parametrize("step, released, expected", [
    (5, 7, 4),    # batches 5..7 were out: all go again
    (0, 1, -1),   # from the start
    (5, 3, 3),    # nothing released past the step: unchanged
])
def test_release_again_starts_at_the_first_batch_not_trained_on(step, released, expected):
    assert unreleased_from(step, released) == expected
    assert list(release_range(published_version=step, max_staleness=2, released_through=expected,
                              total_steps=100))[:1] == [min(step, expected + 1)]


def test_record_window_serves_batches_in_order_and_forgets_trained_ones():
    window = RecordWindow(iter(range(1000)), per_batch=3)
    assert window.batch(1) == [3, 4, 5] and window.batch(0) == [0, 1, 2]
    window.forget_before(1)
    assert len(window) == 3 and window.batch(2) == [6, 7, 8] and len(window) == 6
    with pytest.raises(IndexError, match="batch 0 was trained on"):
        window.batch(0)
    resumed = RecordWindow(iter(range(1000)), per_batch=3, start=2)  # a restored learner at step 2
    assert resumed.batch(2) == [6, 7, 8] and resumed.batch(3) == [9, 10, 11]


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
