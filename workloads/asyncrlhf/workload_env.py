"""The environment contract of the workload processes (`asyncrlhf learner` and `asyncrlhf generator`).

Who sets these variables: the operator's pod specs (`asyncrlhf_operator.plan`) on a cluster, and
`asyncrlhf run` (`local.py`) on one machine. Who reads them: the CLI's workload commands and the
bus's connection (credentials). Each name is spelled here once; everything else imports it, so a
pod spec cannot set a variable under a name the workload does not read.

The distributed rendezvous variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, NNODES,
NPROC_PER_NODE, ...) are torch's and torchrun's names; `backends.distributed.Rendezvous` reads them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

NATS_URL = "ASYNCRLHF_NATS_URL"  # the job's NATS server
SNAPSHOT_DIR = "ASYNCRLHF_SNAPSHOT_DIR"  # the shared volume: snapshots/ and checkpoints/
RUN_DIR = "ASYNCRLHF_RUN_DIR"  # where the learner writes metrics.jsonl and ledger.jsonl
CACHE = "ASYNCRLHF_CACHE"  # where built-in models are built and cached
GENERATOR_ID = "GENERATOR_ID"  # the generator's name on the bus (a pod: its pod name)
SEARCHER = "ASYNCRLHF_SEARCHER"  # the generator's group in generator.searchers (unset: the default group)
NATS_CREDS = "ASYNCRLHF_NATS_CREDS"  # path of a NATS .creds file (from a Secret)
NATS_USER = "ASYNCRLHF_NATS_USER"  # or user and password (from a Secret; never logged)
NATS_PASSWORD = "ASYNCRLHF_NATS_PASSWORD"
# the prefix of the connection's reply subjects: a job's NATS user may only subscribe below its own
NATS_INBOX_PREFIX = "ASYNCRLHF_NATS_INBOX_PREFIX"
NATS_TLS_CA = "ASYNCRLHF_NATS_TLS_CA"  # path of the CA bundle that verifies the server (TLS on when the file exists)
NATS_TLS_CERT = "ASYNCRLHF_NATS_TLS_CERT"  # path of a client certificate (mutual TLS; with NATS_TLS_KEY)
NATS_TLS_KEY = "ASYNCRLHF_NATS_TLS_KEY"
JOB_UID = "ASYNCRLHF_JOB_UID"  # the AsyncRLHFJob's metadata.uid (identity.py; unset: nothing checked)
PROBES_ADDRESS = "ASYNCRLHF_PROBES_ADDRESS"  # host:port of a generator's /readyz and /livez (unset: none)
PROBES_PORT = 8081  # the pods' probe port (kubelet only: no Service, no NetworkPolicy rule needed)

REPORT_SUBDIR = "report"  # the run directory's default: <snapshot dir>/report


class WorkloadEnvError(ValueError):
    """A variable the workload needs is not set."""


def required(name: str, env: Mapping[str, str] = os.environ, default: Optional[str] = None) -> str:
    value = env.get(name) or default
    if not value:
        raise WorkloadEnvError(
            f"environment variable {name} is not set (the operator's pods and `asyncrlhf run` set it; "
            "set it yourself when you start a workload process by hand)"
        )
    return value


@dataclass(frozen=True)
class WorkloadEnv:
    """What a workload process learns from its environment."""

    nats_url: str
    snapshot_dir: str = ""
    run_dir: str = ""
    generator_id: str = ""
    searcher: str = ""
    job_uid: str = ""

    @classmethod
    def for_learner(cls, env: Mapping[str, str] = os.environ, nats_url: str = "") -> "WorkloadEnv":
        root = required(SNAPSHOT_DIR, env)
        return cls(nats_url=required(NATS_URL, env, nats_url), snapshot_dir=root,
                   run_dir=env.get(RUN_DIR) or os.path.join(root, REPORT_SUBDIR), job_uid=env.get(JOB_UID, ""))

    @classmethod
    def for_generator(cls, env: Mapping[str, str] = os.environ, nats_url: str = "") -> "WorkloadEnv":
        return cls(nats_url=required(NATS_URL, env, nats_url), snapshot_dir=env.get(SNAPSHOT_DIR, ""),
                   generator_id=env.get(GENERATOR_ID) or env.get("HOSTNAME") or "gen-0",
                   searcher=env.get(SEARCHER, ""))

    def variables(self) -> dict[str, str]:
        """The variables that carry this environment to a child process."""
        out = {NATS_URL: self.nats_url}
        for name, value in ((SNAPSHOT_DIR, self.snapshot_dir), (RUN_DIR, self.run_dir),
                            (GENERATOR_ID, self.generator_id), (SEARCHER, self.searcher), (JOB_UID, self.job_uid)):
            if value:
                out[name] = value
        return out


def searcher_env(generator_spec, index: int) -> dict[str, str]:
    """`asyncrlhf run`'s generator `index`: the variable naming its TBA searcher group
    (`GeneratorSpec.group_of`); nothing for the default group, or for an index past replicas."""
    try:
        name = generator_spec.group_of(index).name
    except IndexError:
        name = ""
    return {SEARCHER: name} if name else {}
