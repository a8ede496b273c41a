"""The learner's side of the bus: the job's stream and its recovery, the KV bucket, the
subscriptions, weight announcements and dead letters.

Recovery: waiting long for rollouts, the learner asks whether the stream is still the one its
prompts went to. A stream deleted or recreated (NATS storage lost) lost the released prompts:
what is missing is recreated, the weights are announced again (generators find them through the
stream too) and every batch not yet trained on is released again.
"""

from __future__ import annotations

import logging
from typing import Optional

from .api import JobSpec
from .bus import (
    LEARNER_CONSUMER, REWARD_CONSUMER, WEIGHTS, JobBus, StreamWatch, dead_letter, ensure_job_resources, publish,
)
from .faults import fault_point
from .feeding import PromptFeeder
from .intake import RolloutIntake
from .kv import JobKV
from .messages import WeightsAnnouncement

log = logging.getLogger("asyncrlhf.learner")


class LearnerLink:
    def __init__(self, spec: JobSpec, bus: JobBus, feeder: PromptFeeder, intake: RolloutIntake) -> None:
        self.spec, self.bus, self.feeder, self.intake = spec, bus, feeder, intake
        self.js = None
        self.kv: Optional[JobKV] = None
        self.rollouts = None  # the learner's pull subscription
        self.preferences = None  # the reward consumer's, when the one-pass head learns
        self.announced: Optional[WeightsAnnouncement] = None  # the newest snapshot announced (or to announce)
        self._stream = StreamWatch(bus)
        self._recreating = False

    async def open(self, js, with_preferences: bool) -> None:
        """The job's stream, KV bucket and subscriptions; a restored snapshot announced again."""
        self.js = js
        await self.ensure_stream()
        self.kv = await JobKV.open(js, self.bus.bucket)
        self.rollouts = await js.pull_subscribe_bind(LEARNER_CONSUMER, self.bus.stream)
        if with_preferences:
            self.preferences = await js.pull_subscribe_bind(REWARD_CONSUMER, self.bus.stream)
        if self.announced is not None:
            # killed between its checkpoint and the announcement, a learner never announced that
            # snapshot; sync-mode generators would wait for it for ever (the same message id: a
            # no-op when it did go out)
            await self.announce(self.announced)

    async def ensure_stream(self) -> None:
        await ensure_job_resources(self.js, self.bus, self.spec.nats.max_bytes, self.spec.nats.ack_wait_seconds)
        await self._stream.remember(self.js)

    async def check_stream(self) -> None:
        if self._recreating or not await self._stream.lost(self.js):
            return
        self._recreating = True
        try:
            log.warning("the job's stream was deleted or recreated; releasing batches %d.. again",
                        self.feeder.state.step)
            await self.ensure_stream()
            self.intake.forget_held()  # their acks went with the old stream (the pending rollouts are still good)
            if self.announced is not None:
                await self.announce(self.announced)
            self.feeder.mark_all_again()
            await self.feeder.release_due(self.js, self.check_stream)
        finally:
            self._recreating = False

    async def announce(self, ann: WeightsAnnouncement) -> None:
        self.announced = ann
        fault_point("announce")
        await publish(self.js, self.bus.subject(WEIGHTS), ann.encode(), msg_id=f"w-{ann.version}-{ann.checksum[:16]}",
                      recreate=self.check_stream)

    async def release_due(self) -> None:
        await self.feeder.release_due(self.js, self.check_stream)

    async def release_again(self, batch: int, index: int) -> None:
        await self.feeder.again(self.js, batch, index, self.check_stream)

    async def dead_letter(self, msg, reason: str) -> None:
        await dead_letter(self.js, self.bus, msg, reason)
