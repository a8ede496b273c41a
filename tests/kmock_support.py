"""kmock, the Kubernetes API emulator, as the operator tests and bench/operator_bench.py use it.

`Emulator` adds what kopf and owner references need and kmock does not assign (uid,
resourceVersion, generation, names from generateName; a failing JSON-patch `test` answered 422);
`ApiThread` serves it from a thread and loop of its own with every resource the operator uses
declared (see /work/shared/PLATFORM.md, "kopf + kmock"). tests/test_operator_kmock.py,
test_ha_kmock.py and test_kubelet.py use these (the last two through test_operator_kmock).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timezone
from typing import Any, Callable, Optional

import kmock

from asyncrlhf import api

NS = "default"
RESYNC = 2.0  # the operator re-applies every child this often (60 s by default)
CR = f"/apis/{api.GROUP}/{api.VERSION}/namespaces/{NS}/{api.PLURAL}"
VERBS = ["get", "list", "watch", "create", "patch", "update", "delete"]
RESOURCES = {
    f"{api.GROUP}/{api.VERSION}/{api.PLURAL}": dict(kind=api.KIND, subresources=["status"]),
    "v1/configmaps": dict(kind="ConfigMap"),
    "v1/persistentvolumeclaims": dict(kind="PersistentVolumeClaim"),
    "v1/services": dict(kind="Service"),
    "v1/serviceaccounts": dict(kind="ServiceAccount"),
    "v1/secrets": dict(kind="Secret"),
    "v1/pods": dict(kind="Pod"),
    "v1/events": dict(kind="Event"),
    "batch/v1/jobs": dict(kind="Job"),
    "apps/v1/deployments": dict(kind="Deployment"),
    "networking.k8s.io/v1/networkpolicies": dict(kind="NetworkPolicy"),
    "snapshot.storage.k8s.io/v1/volumesnapshots": dict(kind="VolumeSnapshot"),
    "kueue.x-k8s.io/v1beta1/workloads": dict(kind="Workload", subresources=["status"]),
    "v1/namespaces": dict(kind="Namespace", namespaced=False),
}
CHILDREN = {
    "ServiceAccount": "/api/v1/namespaces/default/serviceaccounts/{}-workload",
    "ConfigMap": "/api/v1/namespaces/default/configmaps/{}-config",
    "PersistentVolumeClaim": "/api/v1/namespaces/default/persistentvolumeclaims/{}-snapshots",
    "Service": "/api/v1/namespaces/default/services/{}-learner",
    "NetworkPolicy": "/apis/networking.k8s.io/v1/namespaces/default/networkpolicies/{}-workload",
    "Job": "/apis/batch/v1/namespaces/default/jobs/{}-learner",
    "Deployment": "/apis/apps/v1/namespaces/default/deployments/{}-generator",
}


class Emulator(kmock.KubernetesEmulator):
    """kmock plus what kopf and owner references need: uid, resourceVersion, generation."""

    _versions = itertools.count(1)

    async def _handle(self, request):
        data = request.data
        if request.resource is not None and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if request.action == kmock.action.CREATE:
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("generation", 1)
                meta.setdefault("creationTimestamp", datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
            elif request.action == kmock.action.UPDATE and "spec" in data and request.subresource != "status":
                current = self._current(request)
                if current is not None:  # as the apiserver: a new generation only for a new spec
                    generation = current.get("metadata", {}).get("generation", 1)
                    meta["generation"] = generation + (data["spec"] != current.get("spec"))
            if request.action in (kmock.action.CREATE, kmock.action.UPDATE):
                meta["resourceVersion"] = str(next(self._versions))
        elif request.resource is not None and isinstance(data, list):  # JSON patch
            current = self._current(request) or {}
            for op in data:
                if op.get("op") == "test" and _pointer(current, op["path"]) != op.get("value"):
                    # What a real apiserver answers; kopf then retries with a fresh object.
                    raise kmock.KubernetesError(status=422, reason="Invalid", message="test failed")
            data.append({"op": "add", "path": "/metadata/resourceVersion", "value": str(next(self._versions))})
        return await super()._handle(request)

    def _current(self, request) -> Optional[dict[str, Any]]:
        try:
            obj = self.objects[request.resource, request.namespace, request.name]
        except KeyError:
            return None
        return None if obj.deleted else obj.raw


def _pointer(obj: Any, pointer: str) -> Any:
    for part in pointer.strip("/").split("/"):
        obj = obj.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(obj, dict) else None
    return obj


class ApiThread:
    """kmock served from a thread of its own."""

    def __init__(self, emulator_class: Optional[type] = None) -> None:
        self.url = ""
        self.emulator_class = emulator_class or Emulator  # Emulator or a subclass
        self.emulator: Optional[Emulator] = None  # the running one: its objects, the requests it served
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    def __enter__(self) -> "ApiThread":
        self._thread.start()
        assert self._ready.wait(30), "kmock did not start"
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with self.emulator_class() as emulator, kmock.Server(emulator) as server:
            self.emulator = emulator
            for key, info in RESOURCES.items():
                emulator.resources[key] = kmock.ResourceInfo(
                    verbs=VERBS, namespaced=info.get("namespaced", True), kind=info["kind"],
                    subresources=info.get("subresources", []))
            emulator.objects["v1/namespaces", None, NS] = {
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}
            self.seed(emulator)
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def seed(self, emulator: Emulator) -> None:
        """Objects the emulator holds from the start (a subclass adds its own)."""

    def call(self, method: str, path: str, body: Any = None) -> Optional[dict[str, Any]]:
        return api_call(self.url, method, path, body)

    def get(self, path: str) -> Optional[dict[str, Any]]:
        return self.call("GET", path)


def api_call(url: str, method: str, path: str, body: Any = None) -> Optional[dict[str, Any]]:
    """One JSON request to the emulator (PATCH as a merge patch); None for a 404."""
    content = "application/merge-patch+json" if method == "PATCH" else "application/json"
    request = urllib.request.Request(url + path, method=method, headers={"Content-Type": content},
                                     data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return None
        raise


def eventually(check: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.1)


def write_kubeconfig(path, server: str) -> None:
    """A kubeconfig whose current context is the emulator at `server` (no credentials)."""
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": server}}],
        "users": [{"name": "kmock", "user": {}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
    }))
