"""Identity and network of a job's pods: ServiceAccount, headless learner Service, NetworkPolicy.

The workloads never call the API (no token mounted) and talk only to NATS, DNS, each other
(learner ranks) and, when a model or dataset is a hub id, HTTPS.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from asyncrlhf import api

from .meta import Names, Owner, metadata, selector

RENDEZVOUS_PORT = 29500
DEFAULT_NATS_PORT = 4222


def service_account(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": metadata(owner, Names(owner.name).workload, "workload"),
        "automountServiceAccountToken": False,
    }


def learner_service(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": metadata(owner, Names(owner.name).learner, "learner"),
        "spec": {
            "clusterIP": "None",
            "selector": selector(owner, "learner"),
            # Ranks must find each other before any of them is ready.
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT,
                       "protocol": "TCP"}],
        },
    }


def nats_url(nats: api.NatsSpec, default_url: str) -> str:
    """The job's bus: spec.nats.url, or the operator's default (the chart's NATS) when empty."""
    return nats.url or default_url


def nats_ports(url: str) -> list[int]:
    """Ports of every server in a (comma-separated) NATS URL."""
    ports = set()
    for server in url.split(","):
        server = server.strip()
        if server:
            parsed = urlsplit(server if "://" in server else f"nats://{server}")
            ports.add(parsed.port or DEFAULT_NATS_PORT)
    return sorted(ports) or [DEFAULT_NATS_PORT]


def needs_hub(job: api.AsyncRLHFJob) -> bool:
    """Whether some model or dataset is a hub id (downloaded at start) rather than a local path."""
    spec = job.spec
    refs = [spec.model.policy, spec.model.reference, spec.model.tokenizer, spec.task.reward.model,
            spec.task.reward.onepass.feature_model]
    if spec.task.prompts.source == "dataset":
        refs.append(spec.task.prompts.name)
    return any(r and not r.startswith(("/", api.BUILTIN_MODEL_PREFIX)) for r in refs)


def url_port(url: str) -> int:
    """The TCP port of an http(s) URL (its default when none is given)."""
    parsed = urlsplit(url)
    return parsed.port or (443 if parsed.scheme == "https" else 80)


def metrics_ingress(job: api.AsyncRLHFJob) -> list[dict[str, Any]]:
    """Prometheus scrapes every pod's metrics port (from anywhere, on that port only: where
    Prometheus runs differs per cluster; narrow it with your own policy if you need to)."""
    port = job.spec.metrics.port
    return [{"ports": [{"protocol": "TCP", "port": port}]}] if port else []


def network_policy(job: api.AsyncRLHFJob, owner: Owner, default_url: str) -> dict[str, Any]:
    learners = {"podSelector": {"matchLabels": selector(owner, "learner")}}
    dns = [{"protocol": proto, "port": 53} for proto in ("UDP", "TCP")]
    nats = [{"protocol": "TCP", "port": port} for port in nats_ports(nats_url(job.spec.nats, default_url))]
    egress: list[dict[str, Any]] = [{"ports": dns}, {"ports": nats}, {"to": [learners]}]
    if needs_hub(job):
        egress.append({"ports": [{"protocol": "TCP", "port": 443}]})
    reward_ports = sorted({url_port(http.url) for http in job.spec.task.reward.http_rewards() if http.url})
    if reward_ports:  # the job's reward servers (kind http)
        egress.append({"ports": [{"protocol": "TCP", "port": port} for port in reward_ports]})
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": metadata(owner, Names(owner.name).workload, "workload"),
        "spec": {
            "podSelector": {"matchLabels": selector(owner)},
            "policyTypes": ["Ingress", "Egress"],
            # Learner ranks talk to each other on rendezvous and collective (NCCL/gloo) ports,
            # which are chosen at random: allow all ports, but only among this job's learners.
            "ingress": [{"from": [learners]}] + metrics_ingress(job),
            "egress": egress,
        },
    }
