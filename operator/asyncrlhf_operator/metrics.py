"""Prometheus metrics of the operator: reconciles, errors, jobs by phase."""

from __future__ import annotations

import functools
from typing import Any, Awaitable, Callable

from prometheus_client import Counter, Gauge

PHASES = ("Pending", "Running", "Suspended", "Succeeded", "Failed")

RECONCILES = Counter("asyncrlhf_operator_reconciles_total", "Handler invocations.", ["handler"])
ERRORS = Counter("asyncrlhf_operator_errors_total", "Handler invocations that raised.", ["handler"])
JOBS = Gauge("asyncrlhf_operator_jobs", "AsyncRLHFJobs seen by this operator, by phase.", ["phase"])

HANDLERS = ("reconcile", "update", "delete", "status")
_phases: dict[tuple[str, str], str] = {}

for _handler in HANDLERS:  # export every series from the start, so rate() and alerts see zeros
    RECONCILES.labels(_handler)
    ERRORS.labels(_handler)
for _phase in PHASES:
    JOBS.labels(_phase).set(0)


def instrumented(handler: str) -> Callable:
    """Count the calls and failures of a kopf handler (kopf calls handlers with keywords only)."""

    def wrap(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(fn)
        async def counted(**kwargs: Any) -> Any:
            RECONCILES.labels(handler).inc()
            try:
                return await fn(**kwargs)
            except Exception:
                ERRORS.labels(handler).inc()
                raise

        return counted

    return wrap


def record_phase(namespace: str, name: str, phase: str | None) -> None:
    """Remember a job's phase (None: the job is gone) and refresh the gauge."""
    if phase is None:
        _phases.pop((namespace, name), None)
    else:
        _phases[(namespace, name)] = phase
    for each in PHASES:
        JOBS.labels(each).set(sum(1 for p in _phases.values() if p == each))
