"""The job's KV bucket, typed: every process reads and writes it through `JobKV` and nothing else.

Keys: `learner` (LearnerProgress, written by the learner, read by generators, `asyncrlhf run` and
the operator), `generator.<id>` (GeneratorStatus, one per generator, plus `generator._retired`
summing up generators gone for good), `reward-head` (RewardHead, the one-pass head's θ).
Values are the typed messages of messages.py; a key that is missing reads as None.

Writes of progress and reports are best-effort: a bus hiccup must not crash a learner or a
generator that writes again at its next step; `attempts` > 1 retries once a second (the
learner's final progress, which nothing writes again).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional, TypeVar

import nats
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_fixed

from .messages import (
    GENERATOR_FORGET_SECONDS, RETIRED_GENERATORS, GeneratorStatus, LearnerProgress, Message, MessageError, RewardHead,
)

log = logging.getLogger("asyncrlhf.kv")
LEARNER_KEY = "learner"
GENERATOR_PREFIX = "generator."
HEAD_KEY = "reward-head"
BUS_ERRORS = (nats.errors.Error, asyncio.TimeoutError)
M = TypeVar("M", bound=Message)


def generator_key(generator_id: str) -> str:
    return GENERATOR_PREFIX + generator_id


class JobKV:
    """One job's KV bucket (`kv`: nats-py's KeyValue, or anything with its get/put/keys/delete)."""

    def __init__(self, kv) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, js, bucket: str) -> "JobKV":
        return cls(await js.key_value(bucket))

    # --- primitives ----------------------------------------------------------------------

    async def get(self, key: str, schema: type[M]) -> Optional[M]:
        """The value of `key`: None when it is not there or cannot be read (logged: one bad
        entry must not stop a reader); bus errors are raised."""
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        try:
            return schema.decode(entry.value)
        except MessageError as err:
            log.warning("ignoring the unreadable KV entry %r: %s", key, err)
            return None

    async def put(self, key: str, value: Message, attempts: int = 1) -> bool:
        """Write `value`; on bus errors retry once a second up to `attempts` tries. False when the
        only try failed; an error when several tries all failed (the caller needed this write)."""
        try:
            async for attempt in AsyncRetrying(stop=stop_after_attempt(attempts), wait=wait_fixed(1.0),
                                               retry=retry_if_exception_type(BUS_ERRORS), reraise=True):
                with attempt:
                    await self.kv.put(key, value.encode())
            return True
        except BUS_ERRORS as err:
            log.warning("could not write %s to the job's KV bucket (%d tries): %s", key, attempts, err)
            if attempts > 1:
                raise RuntimeError(f"could not write {key} to the job's KV bucket after {attempts} tries") from err
            return False

    # --- the learner's progress ----------------------------------------------------------

    async def put_progress(self, progress: LearnerProgress, attempts: int = 1) -> bool:
        return await self.put(LEARNER_KEY, progress, attempts)

    async def progress(self) -> Optional[LearnerProgress]:
        """The learner's last progress; None when there is none yet or the bus is away for a moment."""
        try:
            return await self.get(LEARNER_KEY, LearnerProgress)
        except BUS_ERRORS:
            return None

    async def learner_finished(self) -> bool:
        """The learner is done or has failed for good (a generator can stop)."""
        progress = await self.progress()
        return progress is not None and (progress.done or bool(progress.failed))

    # --- the generators' reports ---------------------------------------------------------

    async def put_report(self, status: GeneratorStatus) -> bool:
        return await self.put(generator_key(status.generator_id), status)

    async def reports(self) -> dict[str, GeneratorStatus]:
        """{key: report} of every generator that reported (and the retired summary); bus errors raised."""
        out: dict[str, GeneratorStatus] = {}
        try:
            keys = await self.kv.keys()
        except nats.js.errors.NoKeysError:
            return out
        for key in keys:
            if key.startswith(GENERATOR_PREFIX) and (report := await self.get(key, GeneratorStatus)) is not None:
                out[key] = report  # (None: deleted meanwhile)
        return out

    async def fold_retired(self, reports: dict[str, GeneratorStatus], now: float) -> None:
        """Fold the reports of generators gone for GENERATOR_FORGET_SECONDS into one summary report
        (their rollouts and tokens still count) and delete them: a long job whose generator pods
        come and go keeps a handful of keys, not one per pod it ever had. `reports` is updated in
        place. (The learner is the only caller; a crash between the put and the deletes counts
        them twice.)"""
        gone = {key: r for key, r in reports.items()
                if r.generator_id != RETIRED_GENERATORS and now - r.updated > GENERATOR_FORGET_SECONDS}
        if not gone:
            return
        key = generator_key(RETIRED_GENERATORS)
        before = reports.get(key) or GeneratorStatus(generator_id=RETIRED_GENERATORS, policy_version=0, updated=0.0)
        retired = before.model_copy(update={
            "rollouts": before.rollouts + sum(r.rollouts for r in gone.values()),
            "tokens": before.tokens + sum(r.tokens for r in gone.values()),
        })
        await self.kv.put(key, retired.encode())
        reports[key] = retired
        for old in gone:
            await self.kv.delete(old)
            del reports[old]
        log.info("folded the reports of %d generators gone for good into %s", len(gone), key)

    # --- the one-pass reward head --------------------------------------------------------

    async def put_head(self, head: RewardHead, attempts: int = 1) -> bool:
        return await self.put(HEAD_KEY, head, attempts)

    async def head(self) -> Optional[RewardHead]:
        return await self.get(HEAD_KEY, RewardHead)
