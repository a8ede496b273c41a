"""The learner's rollout intake without a bus: verdicts applied, redeliveries, dead letters."""

from __future__ import annotations

import asyncio

import pytest

from asyncrlhf.checkpoints import LearnerState
from asyncrlhf.intake import UNREADABLE_TRIES, RolloutIntake, TokenLimits, UnreadablePrompt
from asyncrlhf.messages import Completion, RolloutGroup


class Msg:
    """A JetStream message as the intake sees it: data, and what was done with it."""

    def __init__(self, data: bytes) -> None:
        self.data, self.subject, self.acked = data, "asyncrlhf.default.j.rollouts", False

    async def ack(self) -> None:
        self.acked = True


def rollout(batch: int, index: int, version: int, rid: str = "") -> Msg:
    group = RolloutGroup(
        id=rid or f"r-{batch}-{index}", prompt_id="p", batch=batch, index=index, prompt_text="1 2 =",
        prompt_token_ids=[1, 5, 6], policy_version=version, generator_id="g",
        completions=[Completion(text="", token_ids=[5, 2], logprobs=[-0.1, -0.2], eos=True, score=1.0)],
    )
    return Msg(group.encode())


def intake(step: int = 2, published: int = 2, per: int = 2, total: int = 10):
    dead: list[tuple[Msg, str]] = []

    async def dead_letter(msg, reason):
        dead.append((msg, reason))

    state = LearnerState(step=step, published_version=published)
    return RolloutIntake(state, per, max_staleness=1, total_steps=total, dead_letter=dead_letter), dead


def accept(it: RolloutIntake, msg: Msg, step: int = 2):
    return asyncio.run(it.accept(msg, step))


def test_messages_that_cannot_be_rollouts_of_this_job_go_to_the_dead_letters():
    it, dead = intake()
    bad = [Msg(b"not json"), Msg(b'{"v": 1, "id": "x"}'), rollout(2, 5, 2), rollout(10**6, 0, 2)]
    for msg in bad:
        assert accept(it, msg) is None
    assert [reason.split(":")[0] for _, reason in dead] == [
        "undecodable rollout", "undecodable rollout", "rollout out of the job's bounds",
        "rollout out of the job's bounds"]
    assert "index 5 is past learner.promptsPerStep (2)" in dead[2][1]
    assert it.state.dead == 4 and not it.pending and not any(m.acked for m in bad)


def test_a_redelivery_of_a_kept_or_held_rollout_replaces_its_handle_and_is_not_acked():
    it, _ = intake()
    first, again = rollout(2, 0, 2), rollout(2, 0, 2)
    accept(it, first)
    accept(it, again)  # its ack deadline passed while the learner waited: same id, new delivery
    assert not first.acked and not again.acked and it.state.duplicates == 0
    assert it.unacked() == [again]
    accept(it, rollout(2, 1, 2))
    it.take(2)
    later = rollout(2, 0, 2)  # redelivered after the step trained, before the checkpoint
    accept(it, later, step=3)
    assert not later.acked and later in it.held.values() and again not in it.held.values()


def test_other_rollouts_are_acked_and_counted():
    it, dead = intake()
    accept(it, rollout(2, 0, 2))
    other = rollout(2, 0, 1, rid="r-2-0-r1")  # a second answer for a filled slot
    assert accept(it, other) is None and other.acked and it.state.duplicates == 1
    old = rollout(1, 0, 1)  # batch 1 was trained and checkpointed
    assert accept(it, old) is None and old.acked and it.state.duplicates == 2
    future = rollout(3, 0, 7)  # a version this run never published
    assert accept(it, future).policy_version == 7 and future.acked and it.state.dropped == 1
    assert not dead


def group_with(prompt: list[int], completions: list[list[int]], rid: str = "r-2-0") -> Msg:
    return Msg(RolloutGroup(
        id=rid, prompt_id="p", batch=2, index=0, prompt_text="", prompt_token_ids=prompt, policy_version=2,
        generator_id="g", completions=[Completion(text="", token_ids=ids, logprobs=[-0.1] * len(ids), eos=True,
                                                  score=0.0) for ids in completions]).encode())


LIMITS = TokenLimits(vocab_size=100, max_positions=8)
TOKEN_CASES = [  # prompt, completions -> the dead letter's reason ("" = kept)
    ([1, 2, 3], [[4, 5], [6]], ""),
    ([1, 2, 3], [[4, 5, 6, 7, 8]], ""),  # 3 + 5 = 8 positions: exactly fits
    ([1, 2, 3], [[4, 5, 6, 7, 8, 9]], "r-2-0: 3 prompt + 6 completion tokens, more than the model's 8 positions"),
    ([1, 100, 3], [[4]], "r-2-0: prompt has token id 100, outside the model's vocabulary (0..99)"),
    ([1, 2], [[4], [99, 250]], "r-2-0: completion 1 has token id 250, outside the model's vocabulary (0..99)"),
]


@pytest.mark.parametrize("prompt,completions,reason", TOKEN_CASES)
def test_rollouts_the_model_cannot_read_go_to_the_dead_letters(prompt, completions, reason):
    it, dead = intake()
    it.limits = LIMITS
    msg = group_with(prompt, completions)
    back = accept(it, msg)
    if reason:
        assert dead == [(msg, f"rollout the model cannot read: {reason}")] and it.state.dead == 1
        assert not it.pending and not msg.acked
        assert back is not None and (back.batch, back.index) == (2, 0)  # its open slot's prompt goes out again
    else:
        assert back is None and not dead and it.pending[2][0][1] is msg


def test_a_prompt_whose_rollouts_stay_unreadable_stops_the_learner_with_what_to_change():
    it, dead = intake()
    it.limits = LIMITS
    too_long = [[4, 5, 6, 7, 8, 9]]
    for k in range(UNREADABLE_TRIES - 1):
        assert accept(it, group_with([1, 2, 3], too_long, rid=f"r-2-0-{k}")) is not None
    with pytest.raises(UnreadablePrompt, match=r"prompt 0 of step 2 produced 3 rollouts .* Lower spec.generator"):
        accept(it, group_with([1, 2, 3], too_long, rid="r-2-0-last"))
    assert len(dead) == UNREADABLE_TRIES  # every one set aside, none trained


def test_an_unreadable_rollout_of_a_filled_or_trained_slot_releases_nothing():
    it, dead = intake(step=2)
    it.limits = LIMITS
    assert accept(it, group_with([1, 2, 3], [[4]], rid="ok")) is None  # fills slot (2, 0)
    assert accept(it, group_with([1, 2, 3], [[4] * 9], rid="late")) is None
    it.pending.clear()
    assert asyncio.run(it.accept(group_with([1, 2, 3], [[4] * 9], rid="old"), 3)) is None  # batch 2 < step 3
    assert len(dead) == 2


def test_unknown_limits_check_nothing():
    it, dead = intake()  # TokenLimits() by default: a backend that cannot tell
    accept(it, group_with([10**6], [[10**6] * 50]))
    assert not dead and it.pending


def test_the_torch_backend_reports_the_models_limits():
    from asyncrlhf.backends.base import token_limits
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=77, n_positions=33, n_embd=8, n_layer=1, n_head=2))
    assert token_limits(model) == (77, 33)


def test_a_pull_asks_for_fewer_groups_when_groups_may_be_large():
    from asyncrlhf.intake import FETCH_BATCH, fetch_batch

    # 64 MiB a pull at most: nats-server's max_pending; 64 groups of NATS's default 1 MiB
    assert [fetch_batch(n << 20) for n in (1, 2, 8, 48, 64)] == [FETCH_BATCH, 32, 8, 1, 1]
    assert FETCH_BATCH == 64
