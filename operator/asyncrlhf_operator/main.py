"""Entry point of the operator (`asyncrlhf operator`): kopf, a liveness probe and metrics.

Standalone by default (one replica); with $ASYNCRLHF_OPERATOR_PEERING naming a kopf peering
object (the chart sets it), several replicas run and only the oldest acts (kopf peering: the
others pause until it stops or its keep-alive lapses). It serves one namespace (`--namespace`, a Role is enough) or all (`--all-namespaces`, a
ClusterRole that can also list namespaces and CRDs).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

import kopf
import prometheus_client
from asyncrlhf import __version__

from . import natsauth
from .handlers import build_registry
from .settings import OperatorConfig, default_nats_url, default_peering

IN_CLUSTER_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
BUILD = prometheus_client.Info("asyncrlhf_operator_build", "The operator's asyncrlhf version.")


def own_namespace() -> Optional[str]:
    """The namespace this pod runs in, when it runs in a pod."""
    try:
        with open(IN_CLUSTER_NAMESPACE) as f:
            return f.read().strip() or None
    except OSError:
        return None


def run(
    namespace: Optional[str] = None,
    all_namespaces: bool = False,
    nats_url: str = "",
    health_port: int = 8080,
    metrics_port: int = 9090,
    status_interval: float = OperatorConfig.status_interval,
    resync_interval: float = OperatorConfig.resync_interval,
) -> None:
    """Run the operator until SIGINT/SIGTERM.

    `namespace` or `all_namespaces` picks what is watched (neither: the pod's own namespace);
    `nats_url` is the bus for jobs whose spec.nats.url is empty (the chart's NATS; empty:
    $ASYNCRLHF_NATS_URL, else settings.DEFAULT_NATS_URL); liveness at
    http://0.0.0.0:<health_port>/healthz, Prometheus at :<metrics_port>/metrics.
    """
    if namespace and all_namespaces:
        raise ValueError("pass --namespace NS or --all-namespaces, not both")
    if not namespace and not all_namespaces:
        namespace = own_namespace()
        if namespace is None:
            raise ValueError("outside a pod, pass --namespace NS or --all-namespaces")
    nats_url = default_nats_url(nats_url)
    natsauth.authority_from_env()  # JWT mode: a signing seed that cannot be used stops the start, with why
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    peering = default_peering()
    config = OperatorConfig(nats_url=nats_url, status_interval=status_interval,
                            resync_interval=resync_interval, namespaced=bool(namespace), peering=peering)
    logging.getLogger("asyncrlhf_operator").info(
        "asyncrlhf operator %s starting: watching %s", __version__,
        "all namespaces" if all_namespaces else f"namespace {namespace}")
    BUILD.info({"version": __version__})  # asyncrlhf_operator_build_info{version="..."} 1
    if metrics_port:
        prometheus_client.start_http_server(metrics_port)
    asyncio.run(kopf.operator(
        registry=build_registry(config),
        standalone=not peering,
        peering_name=peering or None,
        clusterwide=all_namespaces,
        namespaces=[namespace] if namespace else (),
        liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz" if health_port else None,
    ))
