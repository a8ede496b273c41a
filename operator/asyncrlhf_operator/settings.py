"""The operator's settings, and the one home of its default bus.

A job whose spec.nats.url is empty uses the operator's default NATS URL: `--nats-url`, else
$ASYNCRLHF_NATS_URL, else the chart's NATS Service (`nats://nats:4222`). `asyncrlhf operator`
(cli.py), `main.run` and the handlers all read it from here. No kopf import: the CLI reads
these defaults for its help without loading the operator.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from asyncrlhf import workload_env

DEFAULT_NATS_URL = "nats://nats:4222"  # the chart's NATS Service, in the operator's namespace
# The kopf peering object several replicas share (empty: standalone, one replica). The chart sets it.
PEERING_ENV = "ASYNCRLHF_OPERATOR_PEERING"


@dataclass(frozen=True)
class OperatorConfig:
    nats_url: str = DEFAULT_NATS_URL
    status_interval: float = 5.0
    # every this many seconds the status timer applies all children again (server-side apply:
    # nothing is written when nothing drifted), so a child deleted or edited by hand comes back
    resync_interval: float = 60.0
    namespaced: bool = False  # one namespace: no cluster-wide namespace/CRD scanning (and RBAC)
    # kopf peering (high availability): the name of the (Cluster)KopfPeering object the replicas
    # share; empty runs standalone. The replica with the highest priority acts, the others wait.
    peering: str = ""


def peering_priority(started: float, tiebreak: int) -> int:
    """kopf peering priority of a replica started at `started` (Unix seconds): the oldest replica
    has the highest, so a new replica (a rolling update, a rescheduled pod) never takes over from
    a working one. kopf pauses every replica when two share a priority, so the millisecond is
    followed by 20 random bits (`tiebreak`). Negative: below kopf's default 0 and `--dev` (666),
    so a developer's `kopf run --dev` pauses the cluster's replicas, as kopf intends."""
    return -((int(started * 1000) << 20) | (tiebreak & 0xFFFFF))


def default_peering(env: Mapping[str, str] = os.environ) -> str:
    return env.get(PEERING_ENV, "")


def default_nats_url(given: str = "", env: Mapping[str, str] = os.environ) -> str:
    """The bus for jobs that name none: `given` (--nats-url), else $ASYNCRLHF_NATS_URL, else
    DEFAULT_NATS_URL."""
    return given or env.get(workload_env.NATS_URL) or DEFAULT_NATS_URL
