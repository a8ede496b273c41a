"""The learner's rollout intake: pull rollouts, sort each into its batch's slot, hand over whole batches.

A rollout is kept (with its message, unacked) until its batch is trained, then held until the
checkpoint that covers that step is durable, then acked: a learner killed at any moment loses no
rollout, and the ones it had are redelivered. What schedule.classify says is not to be kept is
acked at once and counted (a rollout too stale is also handed to `on_stale`, which releases its
prompt again).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

import nats

from .checkpoints import LearnerState
from .kv import BUS_ERRORS
from .messages import RolloutGroup
from .schedule import Verdict, classify

log = logging.getLogger("asyncrlhf.learner")
STREAM_CHECK_SECONDS = 10.0  # waiting this long for rollouts, the learner checks that its stream is still there
FETCH_BATCH = 64

Hook = Callable[[], Awaitable[None]]


class RolloutIntake:
    def __init__(self, state: LearnerState, prompts_per_step: int, max_staleness: int) -> None:
        self.state, self.per, self.n = state, prompts_per_step, max_staleness
        self.pending: dict[int, dict[int, tuple[RolloutGroup, object]]] = {}  # batch -> index -> (group, msg)
        self.held: list = []  # messages of trained steps not yet covered by a checkpoint: acked after it

    def unacked(self) -> list:
        """Every message this learner holds: pending for a later step, or used but not checkpointed."""
        return [msg for slots in self.pending.values() for _, msg in slots.values()] + self.held

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
                msgs = await sub.fetch(FETCH_BATCH, timeout=0.5)
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
        group = RolloutGroup.decode(msg.data)
        slot = self.pending.setdefault(group.batch, {})
        verdict = classify(group.batch, group.index, group.policy_version, step, self.n, slot)
        if verdict is Verdict.FRESH:
            slot[group.index] = (group, msg)
            return None
        await msg.ack()
        if verdict is Verdict.STALE:
            self.state.dropped += 1
            log.warning("dropped rollout %s (v%d, too stale); releasing its prompt again", group.id,
                        group.policy_version)
            return group
        self.state.duplicates += 1
        return None

    def take(self, step: int) -> list[RolloutGroup]:
        slots = self.pending.pop(step)
        self.held.extend(slots[i][1] for i in range(self.per))
        return [slots[i][0] for i in range(self.per)]

    def hold(self, msgs: list) -> None:
        """Messages to ack with the next checkpoint (e.g. the preferences the reward head learned)."""
        self.held.extend(msgs)

    def forget_held(self) -> None:
        """The stream was recreated: the held messages' acks went with the old one."""
        self.held.clear()

    async def ack_held(self) -> None:
        """The checkpoint covering the held messages is durable: ack them."""
        for msg in self.held:
            try:
                await msg.ack()
            except BUS_ERRORS as err:  # redelivered later, then skipped
                log.warning("could not ack a rollout (it will come back and be skipped): %s", err)
        self.held.clear()
