"""Why a job's pods or volumes are not coming up: pure functions over pods and PVCs as the API returns them.

A job whose generators crash-loop (OOM, a 401 from the hub), whose image cannot be pulled, whose
Secret is missing or whose pods cannot be scheduled would otherwise sit in Pending or Running
while GPUs idle. The status pass lists the job's pods when not everything is ready, and these
functions turn what kubelet and the scheduler wrote there into one reason (a condition reason and
an Event) and a message naming the pod and what to look at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

# Most telling first: a pull or config error never fixes itself; a crash loop says why in its last exit.
WAITING = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
           "CreateContainerError", "CrashLoopBackOff")
TERMINATED = ("OOMKilled", "Error", "ContainerCannotRun", "DeadlineExceeded")
HINTS = {
    "ErrImagePull": "check spec.image and the pull secret (podTemplate.spec.imagePullSecrets)",
    "ImagePullBackOff": "check spec.image and the pull secret (podTemplate.spec.imagePullSecrets)",
    "InvalidImageName": "fix spec.image",
    "CreateContainerConfigError": "a Secret or ConfigMap the pod names is missing (model.tokenSecret, "
                                  "nats.credentialsSecret, podTemplate env)",
    "OOMKilled": "raise resources.memory (or lower the batch / KV cache)",
    "Unschedulable": "no node fits: check GPUs, nodeSelector/tolerations in podTemplate, and quota",
}
POD_REASONS = frozenset(WAITING + TERMINATED + ("Unschedulable",))


@dataclass(frozen=True)
class Problem:
    reason: str
    message: str


def pod_problem(pods: Iterable[dict[str, Any]]) -> Optional[Problem]:
    """The most telling problem among the pods, or None when none has one."""
    found = [p for p in (_problem_of(pod) for pod in pods) if p is not None]
    order = {reason: i for i, reason in enumerate(("OOMKilled",) + WAITING + TERMINATED + ("Unschedulable",))}
    return min(found, key=lambda p: order.get(p.reason, len(order)), default=None)


def _problem_of(pod: dict[str, Any]) -> Optional[Problem]:
    name = (pod.get("metadata") or {}).get("name", "?")
    status = pod.get("status") or {}
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        last = (container.get("lastState") or {}).get("terminated") or {}
        reason = waiting.get("reason", "")
        if reason == "CrashLoopBackOff" and last.get("reason") in TERMINATED:
            # the crash's own reason says more than "back-off restarting"
            code = last.get("exitCode")
            said = said_last(last.get("message", ""))
            return _problem(last["reason"], f"pod {name}: container {container.get('name')} keeps failing "
                            f"({last['reason']}, exit code {code}, {container.get('restartCount', 0)} restarts)"
                            + (f": {said}" if said else ""))
        if reason in WAITING:
            return _problem(reason, f"pod {name}: container {container.get('name')} {reason}: "
                            f"{waiting.get('message', '')}".rstrip(": "))
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False" \
                and condition.get("reason") == "Unschedulable":
            return _problem("Unschedulable", f"pod {name} cannot be scheduled: {condition.get('message', '')}")
    return None


SAID_MAX = 400  # characters of a container's last words quoted in a condition message


def said_last(termination_message: str) -> str:
    """What a failed container said last (its termination message: with FallbackToLogsOnError, its
    log's last lines): the last `error: ...` line, which the workloads print on purpose before
    exiting 2 (what to fix, never a secret); bounded. Empty when there is none: any other log line
    could be unrelated, or carry what the job's status should not show."""
    errors = [line.strip() for line in termination_message.splitlines() if line.strip().startswith("error:")]
    said = errors[-1] if errors else ""
    return said if len(said) <= SAID_MAX else said[: SAID_MAX - 1] + "…"


def container_said(pods: Iterable[dict[str, Any]], container: str) -> str:
    """What a `container` of these pods said last when it ended with an error (its terminated
    state, or the last one of a restarted container): `said_last` of its termination message."""
    for pod in pods:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            if status.get("name") != container:
                continue
            for state in (status.get("state"), status.get("lastState")):
                ended = (state or {}).get("terminated") or {}
                if ended.get("exitCode") not in (None, 0) and said_last(ended.get("message", "")):
                    return said_last(ended["message"])
    return ""


def _problem(reason: str, message: str) -> Problem:
    hint = HINTS.get(reason)
    return Problem(reason, f"{message} ({hint})" if hint else message)


def claim_problem(claims: Iterable[dict[str, Any]]) -> Optional[Problem]:
    """A PVC of the job that is not bound (Pending or Lost), or None."""
    for claim in claims:
        phase = (claim.get("status") or {}).get("phase", "Pending")
        if phase == "Bound":
            continue
        spec = claim.get("spec") or {}
        name = (claim.get("metadata") or {}).get("name", "?")
        modes = ",".join(spec.get("accessModes") or [])
        storage_class = spec.get("storageClassName") or "the default class"
        reason = "VolumeLost" if phase == "Lost" else "VolumeNotBound"
        return Problem(reason, f"PVC {name} is {phase} ({modes}, {storage_class}): the storage class must "
                       f"provision {modes} volumes; see docs/install.md for RWX options per cloud, or set "
                       "weightSync.accessMode / weightSync.volumeClaim")
    return None
