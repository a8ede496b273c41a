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


@dataclass(frozen=True)
class OperatorConfig:
    nats_url: str = DEFAULT_NATS_URL
    status_interval: float = 5.0
    # every this many seconds the status timer applies all children again (server-side apply:
    # nothing is written when nothing drifted), so a child deleted or edited by hand comes back
    resync_interval: float = 60.0
    namespaced: bool = False  # one namespace: no cluster-wide namespace/CRD scanning (and RBAC)


def default_nats_url(given: str = "", env: Mapping[str, str] = os.environ) -> str:
    """The bus for jobs that name none: `given` (--nats-url), else $ASYNCRLHF_NATS_URL, else
    DEFAULT_NATS_URL."""
    return given or env.get(workload_env.NATS_URL) or DEFAULT_NATS_URL
