"""Spec fields the operator acts on at run time, and which children a spec change touches.

generator.replicas, suspend, ttlSecondsAfterFinished, weightSync.volumeSnapshots,
progressDeadlineSeconds and failOnStall are applied by the operator itself (scale, suspend,
expire, back up, watch for stalls); the workloads never read them. So they
are left out of the rendered config (changing one restarts nothing), and an update that changes
only these applies only the children they concern. Both rules read the one list below.
"""

from __future__ import annotations

from typing import Iterable, Optional

REPLICAS = ("generator", "replicas")
SUSPEND = ("suspend",)
TTL = ("ttlSecondsAfterFinished",)
VOLUME_SNAPSHOTS = ("weightSync", "volumeSnapshots")
PROGRESS_DEADLINE = ("progressDeadlineSeconds",)
FAIL_ON_STALL = ("failOnStall",)
RUNTIME_FIELDS = (REPLICAS, SUSPEND, TTL, VOLUME_SNAPSHOTS, PROGRESS_DEADLINE, FAIL_ON_STALL)


def changed_paths(diff: Iterable) -> set[tuple[str, ...]]:
    """Paths under spec that a kopf diff touches (relative to spec)."""
    paths = set()
    for _op, field, _old, _new in diff:
        path = tuple(field)
        paths.add(path[1:] if path[:1] == ("spec",) else path)
    return paths


def kinds_for(paths: set[tuple[str, ...]]) -> Optional[set[str]]:
    """Which children a spec change touches: None means all of them (and the bus)."""
    paths = {p for p in paths if p[: len(VOLUME_SNAPSHOTS)] != VOLUME_SNAPSHOTS}  # the status timer's
    paths -= {PROGRESS_DEADLINE, FAIL_ON_STALL}  # read by the status timer
    if not paths or paths <= {TTL}:
        return set()
    if paths <= {REPLICAS, TTL}:
        return {"Deployment"}
    if paths <= {REPLICAS, SUSPEND, TTL}:
        return {"Job", "Deployment"}
    return None
