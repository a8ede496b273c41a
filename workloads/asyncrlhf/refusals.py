"""Which snapshots a generator refused, and when it may try each again.

A refusal is not for good: a read error on a network volume is often transient, and a damaged
snapshot is written again by the learner when a generator reports the refusal (same version,
same checksum when the weights are the same). So a refused checksum is tried again after a
delay that doubles with each failure, from RETRY_FIRST_SECONDS up to RETRY_MAX_SECONDS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

RETRY_FIRST_SECONDS = 5.0
RETRY_MAX_SECONDS = 60.0


@dataclass(frozen=True)
class Refusal:
    version: int
    checksum: str
    reason: str
    failures: int
    retry_at: float  # monotonic time


class RefusalLog:
    def __init__(self) -> None:
        self._by_checksum: dict[str, Refusal] = {}
        self.latest: Optional[Refusal] = None  # the newest refusal still standing (reported on the bus)

    def may_try(self, checksum: str, now: float) -> bool:
        refusal = self._by_checksum.get(checksum)
        return refusal is None or now >= refusal.retry_at

    def refuse(self, version: int, checksum: str, reason: str, now: float) -> Refusal:
        before = self._by_checksum.get(checksum)
        failures = before.failures + 1 if before else 1
        delay = min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** (failures - 1))
        self.latest = self._by_checksum[checksum] = Refusal(version, checksum, reason, failures, now + delay)
        return self.latest

    def loaded(self, checksum: str) -> None:
        """A snapshot was loaded: refusals of it, and any older one, no longer stand."""
        self._by_checksum.pop(checksum, None)
        self.latest = None

    def __contains__(self, checksum: str) -> bool:
        return checksum in self._by_checksum
