"""The learner's rollout intake: pull rollouts, sort each into its batch's slot, hand over whole batches.

A rollout is kept (with its message, unacked) until its batch is trained, then held until the
checkpoint that covers that step is durable, then acked: a learner killed at any moment loses no
rollout, and the ones it had are redelivered. A redelivery of a message still kept or held (its
ack deadline passed during a long step) replaces the handle: acking it would delete the only
durable copy. What schedule.classify says is not to be kept is acked at once and counted (a
rollout too stale is also handed to `on_stale`, which releases its prompt again). A message that
cannot be a rollout of this job (undecodable, bad values, a place past the job's shape, token ids
the model has no embedding for, more tokens than its positions) goes to the dead letters, counted:
it never fails the learner (an id past the vocabulary would fail the step's embedding lookup, every
time the message came back). When such a rollout held a real slot of a step still to train, its
prompt goes out again (a new sample may fit) up to UNREADABLE_TRIES times; past that the learner stops
with UnreadablePrompt, naming the prompt and what to change, instead of waiting for ever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import nats

from .checkpoints import LearnerState
from .kv import BUS_ERRORS
from .messages import MessageError, RolloutGroup
from .schedule import Verdict, classify, implausible

log = logging.getLogger("asyncrlhf.learner")
STREAM_CHECK_SECONDS = 10.0  # waiting this long for rollouts, the learner checks that its stream is still there
FETCH_BATCH = 64
FETCH_BYTES = 64 << 20  # at most this many bytes of rollouts asked for in one pull (nats-server's max_pending)


def fetch_batch(max_message_bytes: int) -> int:
    """Rollout groups per pull: FETCH_BATCH, fewer when groups may be large (nats.maxMessageBytes),
    so one pull cannot exceed FETCH_BYTES and make the learner a slow consumer."""
    return max(1, min(FETCH_BATCH, FETCH_BYTES // max_message_bytes))
UNREADABLE_TRIES = 3  # rollouts of one prompt the model cannot read before the learner gives up on the job


class UnreadablePrompt(RuntimeError):
    """A prompt of a step still to train keeps producing rollouts the policy cannot read."""

Hook = Callable[[], Awaitable[None]]
DeadLetter = Callable[[object, str], Awaitable[None]]


@dataclass(frozen=True)
class TokenLimits:
    """What the policy model can read (the TrainingBackend says); 0 = not known, not checked."""

    vocab_size: int = 0  # token ids must be below it (the embedding's rows)
    max_positions: int = 0  # prompt + completion tokens at most this many

    def problem(self, group: RolloutGroup) -> str:
        """Why the model cannot train on `group`, or ""."""
        for name, ids in [("prompt", group.prompt_token_ids)] + [
                (f"completion {k}", c.token_ids) for k, c in enumerate(group.completions)]:
            if self.vocab_size and ids and (max(ids) >= self.vocab_size or min(ids) < 0):
                bad = next(t for t in ids if not 0 <= t < self.vocab_size)
                return f"{group.id}: {name} has token id {bad}, outside the model's vocabulary (0..{self.vocab_size - 1})"
        longest = max((len(c.token_ids) for c in group.completions), default=0)
        if self.max_positions and len(group.prompt_token_ids) + longest > self.max_positions:
            return (f"{group.id}: {len(group.prompt_token_ids)} prompt + {longest} completion tokens, more than "
                    f"the model's {self.max_positions} positions")
        return ""


class RolloutIntake:
    def __init__(self, state: LearnerState, prompts_per_step: int, max_staleness: int, total_steps: int,
                 dead_letter: DeadLetter, limits: TokenLimits = TokenLimits(), batch: int = FETCH_BATCH) -> None:
        self.state, self.per, self.n, self.total = state, prompts_per_step, max_staleness, total_steps
        self.limits, self.batch = limits, batch
        self.dead_letter = dead_letter
        self.pending: dict[int, dict[int, tuple[RolloutGroup, object]]] = {}  # batch -> index -> (group, msg)
        # messages of trained steps not yet covered by a checkpoint (acked after it), by rollout id
        self.held: dict[str, object] = {}
        self._dead_reasons: set[str] = set()
        self._unreadable: dict[tuple[int, int], int] = {}  # (batch, index) -> rollouts set aside

    def unacked(self) -> list:
        """Every message this learner holds: pending for a later step, or used but not checkpointed."""
        return [msg for slots in self.pending.values() for _, msg in slots.values()] + list(self.held.values())

    def complete(self, step: int) -> bool:
        return len(self.pending.get(step, {})) >= self.per

    async def collect(self, sub, step: int, stopping: asyncio.Event, *, check_stream: Hook,
                      on_stale: Callable[[RolloutGroup], Awaitable[None]], between: Hook) -> list[RolloutGroup]:
        """Pull until every group of batch `step` is here (later batches stay pending); return them
        in prompt order. `check_stream` runs when pulls fail or nothing came for a while, `between`
        after every pull."""
        idle_since = time.monotonic()
        while not self.complete(step):
            if stopping.is_set():
                raise asyncio.CancelledError
            try:
                msgs = await sub.fetch(self.batch, timeout=0.5)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                msgs = []
            except nats.errors.Error as err:  # no consumer (the stream is gone), the bus away, ...
                log.warning("cannot pull rollouts: %s", err)
                await asyncio.sleep(1.0)
                await check_stream()
                continue
            if msgs:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > STREAM_CHECK_SECONDS:
                idle_since = time.monotonic()
                await check_stream()
            for msg in msgs:
                group = await self.accept(msg, step)
                if group is not None:
                    await on_stale(group)
            await between()
        return self.take(step)

    async def accept(self, msg, step: int):
        """Sort one rollout message; returns the group when it was dropped as too stale."""
        try:
            group = RolloutGroup.decode(msg.data)
        except MessageError as err:
            await self.dead(msg, "undecodable rollout", str(err))
            return None
        if reason := implausible(group.batch, group.index, self.per, self.total):
            await self.dead(msg, "rollout out of the job's bounds", f"{group.id}: {reason}")
            return None
        if reason := self.limits.problem(group):
            await self.dead(msg, "rollout the model cannot read", reason)
            return self._retry_unreadable(group, step, reason)
        slots = self.pending.get(group.batch, {})
        verdict = classify(group.batch, group.index, group.policy_version, step, self.n, slots,
                           self.state.published_version)
        if verdict is Verdict.FRESH:
            self.pending.setdefault(group.batch, {})[group.index] = (group, msg)
            return None
        if self._redelivered(group, msg, verdict):
            return None
        await msg.ack()
        if verdict is Verdict.STALE:
            self.state.dropped += 1
            log.warning("dropped rollout %s (v%d, too stale); releasing its prompt again", group.id,
                        group.policy_version)
            return group
        self.state.duplicates += 1
        return None

    def _retry_unreadable(self, group: RolloutGroup, step: int, reason: str):
        """The group when its prompt should go out again (its slot is still open), else None."""
        if group.batch < step or group.index in self.pending.get(group.batch, {}):
            return None  # trained already, or the slot is filled: nothing waits for it
        key = (group.batch, group.index)
        self._unreadable = {k: v for k, v in self._unreadable.items() if k[0] >= step}
        self._unreadable[key] = self._unreadable.get(key, 0) + 1
        if self._unreadable[key] >= UNREADABLE_TRIES:
            raise UnreadablePrompt(
                f"prompt {group.index} of step {group.batch} produced {UNREADABLE_TRIES} rollouts the policy "
                f"cannot read (last: {reason}); step {group.batch} cannot be trained. Lower "
                "spec.generator.sampling.maxTokens or shorten the prompt so prompt + completion fit the model's "
                "positions, and check the generators use the learner's model and tokenizer")
        return group

    def _redelivered(self, group: RolloutGroup, msg, verdict: Verdict) -> bool:
        """A redelivery of a message this learner keeps or holds: keep the newest handle, ack nothing."""
        if verdict is Verdict.DUPLICATE and self.pending[group.batch][group.index][0].id == group.id:
            self.pending[group.batch][group.index] = (group, msg)
            return True
        if verdict is Verdict.TRAINED and group.id in self.held:
            self.held[group.id] = msg
            return True
        return False

    async def dead(self, msg, kind: str, detail: str) -> None:
        """Set a message aside (dead letters), count it, log each kind of problem once."""
        self.state.dead += 1
        if kind not in self._dead_reasons:
            self._dead_reasons.add(kind)
            log.error("%s, set aside in the job's dead letters (further ones are counted, not logged): %s",
                      kind, detail[:500])
        await self.dead_letter(msg, f"{kind}: {detail}")

    def take(self, step: int) -> list[RolloutGroup]:
        slots = self.pending.pop(step)
        self.held.update((slots[i][0].id, slots[i][1]) for i in range(self.per))
        return [slots[i][0] for i in range(self.per)]

    def hold(self, key: str, msg) -> None:
        """A message to ack with the next checkpoint (e.g. a preference the reward head learned)."""
        self.held[key] = msg

    def forget_held(self) -> None:
        """The stream was recreated: the held messages' acks went with the old one."""
        self.held.clear()

    async def ack_held(self) -> None:
        """The checkpoint covering the held messages is durable: ack them."""
        for msg in self.held.values():
            try:
                await msg.ack()
            except BUS_ERRORS as err:  # redelivered later, then skipped
                log.warning("could not ack a rollout (it will come back and be skipped): %s", err)
        self.held.clear()
