"""Kubernetes' strategic merge, for a job's pod template over the operator's pod.

What `kubectl patch --type strategic` does, for the fields a pod template may set: maps merge
key by key; lists whose Kubernetes type names a patch merge key (containers, env, volumes and
imagePullSecrets by name, volumeMounts by mountPath, topologySpreadConstraints by topologyKey;
read from the OpenAPI types by `podschema`) merge item by item on that key, the operator's
items first, in their order; other lists are replaced, except tolerations and envFrom, which
are appended so a template's toleration never removes the GPU toleration the operator adds.
No `$patch` directives: a template adds and overrides, it cannot delete.
"""

from __future__ import annotations

import copy
from typing import Any

from .. import podschema

APPENDED = frozenset({"tolerations", "containers[].envFrom"})
# Kubernetes' `retainKeys` strategy (PodSpec.volumes): a volume redefined by name keeps only the
# keys the template gives, so `cache` becomes a PVC instead of an emptyDir *and* a PVC.
RETAIN_KEYS = frozenset({"volumes"})


def strategic_merge(base: Any, overlay: Any, path: str = "") -> Any:
    """`overlay` merged over `base` (neither is modified); `path` is where they sit in a PodSpec."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        merged = dict(base)
        for key, value in overlay.items():
            sub = f"{path}.{key}" if path else key
            merged[key] = strategic_merge(base[key], value, sub) if key in base else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(overlay, list):
        key = podschema.merge_keys().get(path)
        if key:
            return _merge_by_key(base, overlay, key, f"{path}[]", retain=path in RETAIN_KEYS)
        if path in APPENDED:
            return list(base) + [copy.deepcopy(item) for item in overlay if item not in base]
    return copy.deepcopy(overlay)


def _merge_by_key(base: list, overlay: list, key: str, path: str, *, retain: bool) -> list:
    merged = list(base)
    index = {item.get(key): i for i, item in enumerate(merged) if isinstance(item, dict)}
    for item in overlay:
        name = item.get(key) if isinstance(item, dict) else None
        if name is not None and name in index:
            old = merged[index[name]]
            if retain:
                old = {k: v for k, v in old.items() if k in item}
            merged[index[name]] = strategic_merge(old, item, path)
        else:
            merged.append(copy.deepcopy(item))
    return merged
