"""High availability: two operator replicas with kopf peering against kmock; only one acts.

Both run the real registry with `OperatorConfig(peering=...)` (what $ASYNCRLHF_OPERATOR_PEERING
sets in the chart) and share one ClusterKopfPeering object, whose status kmock keeps and
watches like an API server. Each registry also gets a probe timer that counts its own runs on
the job: kopf runs no handler of a paused operator, so the counts show which replica acts. The
older replica has the higher priority (settings.peering_priority) and acts; the younger waits;
when the older stops (SIGTERM: kopf removes itself from the peering object at exit), the
younger takes over."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from kopf.testing import KopfRunner

import kopf
from asyncrlhf import api
from asyncrlhf.bus import EmbeddedNats
from asyncrlhf_operator.handlers import RESOURCE, build_registry
from asyncrlhf_operator.settings import OperatorConfig, peering_priority
from kmock_support import CR, NS, RESOURCES, ApiThread, eventually, write_kubeconfig

PEERING = "asyncrlhf"
RUNS: Counter = Counter()  # probe timer runs per operator


class PeeringApi(ApiThread):
    """kmock with kopf's peering resources and the shared ClusterKopfPeering object."""

    async def _serve(self) -> None:
        original = dict(RESOURCES)
        RESOURCES.update({"kopf.dev/v1/clusterkopfpeerings": dict(kind="ClusterKopfPeering", namespaced=False),
                          "kopf.dev/v1/kopfpeerings": dict(kind="KopfPeering")})
        try:
            await super()._serve()
        finally:
            RESOURCES.clear()
            RESOURCES.update(original)

    def seed(self, emulator) -> None:
        emulator.objects["kopf.dev/v1/clusterkopfpeerings", None, PEERING] = {
            "apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": PEERING}}


def replica(name: str, nats_url: str) -> KopfRunner:
    registry = build_registry(OperatorConfig(nats_url=nats_url, status_interval=0.5, peering=PEERING))

    @kopf.timer(*RESOURCE, interval=0.3, registry=registry)
    async def probe(**_: Any) -> None:
        RUNS[name] += 1

    return KopfRunner(["run", "-A"], registry=registry, timeout=30)


def test_the_priority_prefers_the_oldest_replica_and_never_ties():
    assert peering_priority(1000.0, 0) > peering_priority(1000.001, 0) > peering_priority(2000.0, 0)
    assert peering_priority(1000.0, 1) != peering_priority(1000.0, 2)
    assert -(2**63) < peering_priority(4102444800.0, 0xFFFFF) < 0  # int64 until 2100, below kopf's default 0


def test_two_replicas_with_peering_only_the_oldest_acts_and_the_other_takes_over(tmp_path):
    with EmbeddedNats() as bus, PeeringApi() as kube:
        kubeconfig = tmp_path / "config"
        write_kubeconfig(kubeconfig, kube.url)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("KUBECONFIG", str(kubeconfig))
            mp.setattr("kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
            mp.delenv("KUBERNETES_SERVICE_HOST", raising=False)
            peering = f"/apis/kopf.dev/v1/clusterkopfpeerings/{PEERING}"
            old = replica("old", bus.url).__enter__()
            try:
                eventually(lambda: len((kube.get(peering) or {}).get("status") or {}) == 1, what="one peer")
                with replica("young", bus.url):
                    eventually(lambda: len(kube.get(peering).get("status") or {}) == 2, what="two peers")
                    kube.call("POST", CR, {"apiVersion": api.API_VERSION, "kind": api.KIND,
                                           "metadata": {"name": "ha", "namespace": NS}, "spec": {}})
                    eventually(lambda: kube.get("/apis/batch/v1/namespaces/default/jobs/ha-learner"),
                               what="the job handled")
                    eventually(lambda: RUNS["old"] >= 5, what="the old replica's timer running")
                    assert RUNS["young"] == 0  # paused: not one handler ran
                    old.__exit__(None, None, None)  # stop the acting replica (as on SIGTERM)
                    old = None
                    eventually(lambda: len(kube.get(peering).get("status") or {}) == 1, what="the old one gone")
                    eventually(lambda: RUNS["young"] >= 3, timeout=30, what="the young replica took over")
                    kube.call("POST", CR, {"apiVersion": api.API_VERSION, "kind": api.KIND,
                                           "metadata": {"name": "ha2", "namespace": NS}, "spec": {}})
                    eventually(lambda: kube.get("/apis/batch/v1/namespaces/default/jobs/ha2-learner"),
                               what="a new job handled by the new leader")
            finally:
                if old is not None:
                    old.__exit__(None, None, None)
