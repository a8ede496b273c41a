"""The learner's prompt feed: the one path by which prompts reach the bus, first time or again.

Batch b's prompts are published once the staleness bound allows (schedule.release_range), all at
once so a generator gets them in one fetch, each tagged with schedule.min_version. The same
publish serves the two ways a prompt goes out again: one prompt whose rollout was dropped (a new
attempt: a new message id, so JetStream's de-duplication lets it through), and every batch not yet
trained on after the bus lost them (same ids: where the bus still has them, the publish is a no-op,
and a rollout that arrives twice is skipped as filling its slot twice).
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Optional

from .api import JobSpec
from .bus import PROMPTS, JobBus, publish
from .checkpoints import LearnerState
from .messages import Prompt
from .replay import generated_samples
from .schedule import RecordWindow, attempt_key, forget_attempts, min_version, release_range, unreleased_from
from .tasks import PromptRecord, prompt_stream

Recreate = Callable[[], Awaitable[None]]


class PromptFeeder:
    def __init__(self, spec: JobSpec, bus: JobBus, state: LearnerState) -> None:
        self.spec, self.bus, self.state = spec, bus, state
        self.n = spec.async_.effective_staleness
        self._window: Optional[RecordWindow] = None

    @property
    def window(self) -> RecordWindow:
        """The prompts of the batches not trained on yet (made at first use: a restored learner's
        window starts at its checkpoint's step)."""
        if self._window is None:
            stream = prompt_stream(self.spec.task.prompts, self.spec.learner.seed)
            self._window = RecordWindow(stream, self.spec.learner.prompts_per_step, start=self.state.step)
        return self._window

    def records(self, batch: int) -> list[PromptRecord]:
        return self.window.batch(batch)

    def forget_before(self, step: int) -> None:
        """Drop what only batches before `step` needed: memory stays flat however long the run."""
        self.window.forget_before(step)
        self.state.rereleased = forget_attempts(self.state.rereleased, step)

    async def release_due(self, js, recreate: Optional[Recreate] = None) -> None:
        """Publish every batch the staleness bound allows and that is not out yet."""
        st = self.state
        for b in release_range(st.published_version, self.n, st.released_through, self.spec.learner.total_steps):
            await asyncio.gather(*(self._publish(js, b, i, 0, recreate) for i in range(len(self.records(b)))))
            st.released_through = b

    def mark_all_again(self) -> None:
        """Every batch not trained on yet goes out again at the next release_due (the bus may
        have lost them: a new NATS, a recreated stream, `run --resume`)."""
        self.state.released_through = unreleased_from(self.state.step, self.state.released_through)

    async def again(self, js, batch: int, index: int, recreate: Optional[Recreate] = None) -> None:
        """Publish one prompt again as a new attempt (its rollout was dropped)."""
        key = attempt_key(batch, index)
        self.state.rereleased[key] = self.state.rereleased.get(key, 0) + 1
        await self._publish(js, batch, index, self.state.rereleased[key], recreate)

    async def _publish(self, js, b: int, i: int, attempt: int, recreate: Optional[Recreate]) -> None:
        rec = self.records(b)[i]
        pid = f"{self.bus.job}-p{b}-{i}" + (f"-r{attempt}" if attempt else "")
        msg = Prompt(id=pid, batch=b, index=i, text=rec.text, answer=rec.answer, attempt=attempt,
                     samples=generated_samples(self.spec), min_version=min_version(b, self.n),
                     messages=rec.messages, columns=rec.columns)
        await publish(js, self.bus.subject(PROMPTS), msg.encode(), msg_id=msg.id, recreate=recreate)
