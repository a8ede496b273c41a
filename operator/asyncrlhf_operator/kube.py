"""The one module that talks to the Kubernetes API (besides kopf itself).

A small async client over aiohttp, authenticated with the same `kopf.ConnectionInfo` kopf
logs in with (in-cluster service account or kubeconfig), so there is one notion of "who the
operator is". Children are applied with server-side apply (field manager
`asyncrlhf-operator`, forced: the operator owns the fields it sets); when the apply endpoint
answers 404 for a missing object — which only API emulators do, a real apiserver creates it —
the object is created with a POST instead, so the same code runs against kmock in tests.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import aiohttp
import kopf

from asyncrlhf import api

FIELD_MANAGER = "asyncrlhf-operator"
# (apiVersion, kind) → plural, for every kind the operator reads or writes.
PLURALS = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaims",
    ("v1", "Service"): "services",
    ("v1", "ServiceAccount"): "serviceaccounts",
    ("v1", "Secret"): "secrets",
    ("v1", "Pod"): "pods",
    ("batch/v1", "Job"): "jobs",
    ("apps/v1", "Deployment"): "deployments",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshot"): "volumesnapshots",
    ("kueue.x-k8s.io/v1beta1", "Workload"): "workloads",
    (api.API_VERSION, api.KIND): api.PLURAL,
}


class KubeError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message


def path(api_version: str, kind: str, namespace: str, name: str = "") -> str:
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    url = f"{prefix}/namespaces/{namespace}/{PLURALS[(api_version, kind)]}"
    return f"{url}/{name}" if name else url


class Kube:
    """Create/apply, get and delete namespaced objects."""

    def __init__(self) -> None:
        self._info: Optional[kopf.ConnectionInfo] = None
        self._session: Optional[aiohttp.ClientSession] = None
        self._stale: list[aiohttp.ClientSession] = []

    def use(self, info: kopf.ConnectionInfo) -> None:
        """Adopt fresh credentials (called from the login handler, also on re-login)."""
        self._info = info
        if self._session is not None:
            self._stale.append(self._session)
            self._session = None

    async def close(self) -> None:
        for session in self._stale + ([self._session] if self._session else []):
            await session.close()
        self._stale, self._session = [], None

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        url = path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        try:
            return await self._request(
                "PATCH", url, body=obj, params={"fieldManager": FIELD_MANAGER, "force": "true"},
                content_type="application/apply-patch+yaml",
            )
        except KubeError as err:
            if err.status != 404:
                raise
        try:
            return await self._request("POST", path(obj["apiVersion"], obj["kind"], meta["namespace"]),
                                       body=obj, params={"fieldManager": FIELD_MANAGER})
        except KubeError as err:
            if err.status != 409:  # created meanwhile by another handler: apply over it
                raise
        return await self._request(
            "PATCH", url, body=obj, params={"fieldManager": FIELD_MANAGER, "force": "true"},
            content_type="application/apply-patch+yaml",
        )

    async def merge_patch(self, api_version: str, kind: str, namespace: str, name: str,
                          patch: dict[str, Any]) -> dict[str, Any]:
        return await self._request("PATCH", path(api_version, kind, namespace, name), body=patch,
                                   content_type="application/merge-patch+json")

    async def patch_status(self, api_version: str, kind: str, namespace: str, name: str,
                           patch: dict[str, Any]) -> dict[str, Any]:
        """A JSON merge patch of the status subresource (a resourceVersion in it makes it conditional)."""
        return await self._request("PATCH", path(api_version, kind, namespace, name) + "/status", body=patch,
                                   content_type="application/merge-patch+json")

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> Optional[dict[str, Any]]:
        try:
            return await self._request("GET", path(api_version, kind, namespace, name))
        except KubeError as err:
            if err.status == 404:
                return None
            raise

    async def list(self, api_version: str, kind: str, namespace: str,
                   labels: dict[str, str]) -> list[dict[str, Any]]:
        """Objects whose labels include `labels` (filtered here too: API emulators ignore selectors)."""
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        found = await self._request("GET", path(api_version, kind, namespace), params={"labelSelector": selector})
        items = (found or {}).get("items") or []
        return [item for item in items
                if labels.items() <= ((item.get("metadata") or {}).get("labels") or {}).items()]

    async def delete(self, api_version: str, kind: str, namespace: str, name: str,
                     propagation: str = "Background") -> bool:
        """Delete; False when it was already gone."""
        try:
            await self._request("DELETE", path(api_version, kind, namespace, name),
                                params={"propagationPolicy": propagation})
        except KubeError as err:
            if err.status == 404:
                return False
            raise
        return True

    async def _request(self, method: str, url: str, *, body: Any = None, params=None,
                       content_type: str = "application/json") -> Any:
        session = self._connect()
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        async with session.request(method, self._info.server.rstrip("/") + url, data=data,
                                   params=params, headers=headers) as response:
            text = await response.text()
            payload = json.loads(text) if text.strip() else None
            if response.status >= 400:
                payload = payload if isinstance(payload, dict) else {}
                raise KubeError(response.status, payload.get("reason", response.reason or ""),
                                payload.get("message", text[:500]))
            return payload

    def _connect(self) -> aiohttp.ClientSession:
        if self._info is None:
            raise RuntimeError("not logged in: the operator's login handler has not run yet")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._info.as_ssl_context()),
                headers={**self._info.as_http_headers(), "User-Agent": FIELD_MANAGER},
                timeout=aiohttp.ClientTimeout(total=30),
            )
        return self._session
