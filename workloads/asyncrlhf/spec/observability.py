"""The spec's `metrics` section and `generator.autoscale`: seeing a running job, and steering it.

`metrics.port` is where every learner (rank 0) and generator serves Prometheus metrics
(telemetry.py); the operator's pods name it as the container port `metrics`, and `asyncrlhf run`
gives each local process a port of its own starting there. `generator.autoscale` bounds the
generator count that the autoscaler's policy (autoscale.py) chooses from the bus's signals.
"""

from __future__ import annotations

from pydantic import Field

from .base import SpecModel


class MetricsSpec(SpecModel):
    """Prometheus metrics of the workload processes."""

    port: int = Field(
        9410, ge=0, le=65535,
        description="Port of each learner and generator's /metrics (0 = off). Locally, `asyncrlhf run` "
        "serves each process's metrics on a free port of 127.0.0.1 and prints the URLs.",
    )


class AutoscaleSpec(SpecModel):
    """Generators that scale themselves from the bus's signals (autoscale.py)."""

    enabled: bool = Field(False, description="Let the autoscaler choose the generator count (replicas).")
    min_replicas: int = Field(1, ge=0, le=1024, description="Fewest generators.")
    max_replicas: int = Field(4, ge=1, le=1024, description="Most generators.")
    target_wait_fraction: float = Field(
        0.1, ge=0, le=1,
        description="The learner may wait for rollouts this fraction of its time; more means too few generators.",
    )
    target_idle_fraction: float = Field(
        0.3, ge=0, le=1,
        description="Generators may idle (no prompts, or waiting for weights) this fraction of their time; "
        "more, with no prompt backlog, means too many generators.",
    )
    max_step: int = Field(2, ge=1, le=1024, description="Most generators added or removed by one decision.")
    stabilization_seconds: int = Field(
        120, ge=0, le=86400,
        description="A scale-down is applied only when every decision of this window agreed on fewer "
        "generators (scale-ups apply at once); also the shortest time between two changes.",
    )
    interval_seconds: int = Field(30, ge=5, le=3600, description="Seconds between two decisions.")

