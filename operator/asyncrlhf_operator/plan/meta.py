"""Names, labels and owner references every child of a job shares.

One place for how a child is named and labelled, so the selectors (Service, NetworkPolicy,
Deployment) and the objects they select cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from asyncrlhf import api

MANAGER = "asyncrlhf-operator"


@dataclass(frozen=True)
class Owner:
    """The job object the children belong to."""

    name: str
    namespace: str
    uid: str


@dataclass(frozen=True)
class Names:
    job: str

    @property
    def config(self) -> str:
        return f"{self.job}-config"

    @property
    def snapshots(self) -> str:
        return f"{self.job}-snapshots"

    @property
    def model_cache(self) -> str:
        return f"{self.job}-model-cache"

    @property
    def learner(self) -> str:  # the Job and its headless Service share the name
        return f"{self.job}-learner"

    @property
    def generator(self) -> str:
        return f"{self.job}-generator"

    @property
    def workload(self) -> str:  # ServiceAccount and NetworkPolicy
        return f"{self.job}-workload"

    @property
    def nats(self) -> str:  # the operator's Secret for the job's bus: minted creds, the operator's CA
        return f"{self.job}-nats"


def selector(owner: Owner, component: Optional[str] = None) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": "asyncrlhf", "app.kubernetes.io/instance": owner.name}
    if component:
        labels["app.kubernetes.io/component"] = component
    return labels


def labels(owner: Owner, component: str) -> dict[str, str]:
    return {**selector(owner, component), "app.kubernetes.io/managed-by": MANAGER}


def owner_reference(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION, "kind": api.KIND, "name": owner.name, "uid": owner.uid,
        "controller": True, "blockOwnerDeletion": True,
    }


def metadata(owner: Owner, name: str, component: str, *, owned: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": owner.namespace, "labels": labels(owner, component)}
    if owned:
        meta["ownerReferences"] = [owner_reference(owner)]
    return meta
