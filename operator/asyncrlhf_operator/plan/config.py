"""The ConfigMap the workloads read: the job manifest, defaults filled in, run-time fields left out.

Its hash annotates the pod templates, so a config change (and only that) replaces the learner.
"""

from __future__ import annotations

import hashlib
from typing import Any

import yaml

from asyncrlhf import api

from .meta import Names, Owner, metadata
from .runtime import RUNTIME_FIELDS

CONFIG_DIR = "/etc/asyncrlhf"
CONFIG_KEY = "job.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_KEY}"
CONFIG_HASH = f"{api.GROUP}/config-hash"


def rendered_config(job: api.AsyncRLHFJob) -> str:
    """The job manifest the workloads read, defaults filled in, run-time fields left out."""
    manifest = job.to_manifest()
    manifest.pop("status", None)
    manifest["metadata"] = {"name": job.metadata.name, "namespace": job.metadata.namespace}
    for path in RUNTIME_FIELDS:
        parent = manifest["spec"]
        for key in path[:-1]:
            parent = parent[key]
        parent.pop(path[-1], None)
    # without generator.replicas the workloads read the default (1), which TBA searchers adding up
    # to more, or autoscale.minReplicas above 1, would refuse: the smallest count the spec allows
    # instead (fixed by fields that are not run-time ones, so scaling still changes nothing here)
    generator = job.spec.generator
    floor = max(sum(s.replicas for s in generator.searchers),
                generator.autoscale.min_replicas if generator.autoscale.enabled else 0)
    if floor > 1:
        manifest["spec"]["generator"]["replicas"] = floor
    return yaml.safe_dump(manifest, sort_keys=False)


def config_hash(job: api.AsyncRLHFJob) -> str:
    return hashlib.sha256(rendered_config(job).encode()).hexdigest()[:16]


def config_map(job: api.AsyncRLHFJob, owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": metadata(owner, Names(owner.name).config, "config"),
        "data": {CONFIG_KEY: rendered_config(job)},
    }
