"""From what is observed to `.status`: pure functions, no API calls, no clock reads.

Inputs are the learner Job's and the generator Deployment's `.status` as the API returns them,
the learner's `LearnerProgress` and the generators' `GeneratorStatus` from the job's KV bucket,
the previous `.status`, and the operator's restart count. Outputs are the new `.status` (the
camelCase shape of `api.JobStatus`) and the decision on a failed learner.

Phases: Pending → Running ⇄ Suspended → Succeeded | Failed. The terminal phases stick (a
finished job is not resurrected), except a Failed caused by an invalid spec, which a corrected
spec clears.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, Optional

from asyncrlhf import api
from asyncrlhf.messages import GeneratorStatus, LearnerProgress

from .health import Problem, claim_problem, container_said, pod_problem

# Generators that have not reported for this long are gone (scaled down, crashed, replaced).
TERMINAL = ("Succeeded", "Failed")
ALWAYS_SHOWN = ("Ready", "Progressing", "Suspended")
SHOWN_ONCE_TRUE = ("Succeeded", "Failed", "SpecInvalid", "Stalled")

LearnerState = Literal["absent", "deleting", "pending", "running", "succeeded", "failed"]
Action = Literal["none", "restart", "fail"]


@dataclass(frozen=True)
class Observed:
    """Everything the status depends on, gathered by the handlers."""

    now: datetime
    generation: int = 0
    spec: Optional[api.JobSpec] = None
    spec_error: str = ""  # "spec.<field>: <what is wrong>" when the spec does not validate
    learner: Optional[dict[str, Any]] = None  # the learner Job (metadata + status), None if absent
    generators: Optional[dict[str, Any]] = None  # the generator Deployment's status
    progress: Optional[LearnerProgress] = None
    reports: tuple[GeneratorStatus, ...] = field(default_factory=tuple)
    restarts: int = 0
    pods: tuple[dict[str, Any], ...] = ()  # the job's pods, read only when something is not ready
    claims: tuple[dict[str, Any], ...] = ()  # its PVCs, read with the pods
    generator_selector: str = ""  # label selector of the generator pods (the scale subresource's)
    # Kueue holds the job (not admitted yet, or evicted): the reason and message to show
    hold_reason: str = ""
    hold_message: str = ""


def timestamp(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(text: str) -> Optional[datetime]:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# The learner


def _job_condition(job: dict[str, Any], kind: str) -> Optional[dict[str, Any]]:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return condition
    return None


def learner_state(job: Optional[dict[str, Any]], nodes: int) -> LearnerState:
    if job is None:
        return "absent"
    if (job.get("metadata") or {}).get("deletionTimestamp"):
        return "deleting"
    if _job_condition(job, "Complete") or _job_condition(job, "SuccessCriteriaMet"):
        return "succeeded"
    if _job_condition(job, "Failed") or _job_condition(job, "FailureTarget"):
        return "failed"
    status = job.get("status") or {}
    ready = status.get("ready", status.get("active", 0)) or 0
    return "running" if ready >= nodes else "pending"


def learner_failure(obs: Observed) -> str:
    """Why the learner failed, in the learner's own words when it said any: its last progress
    report, else the Job's condition with the `error:` line a learner pod ended with (one that
    exits 2 before it reaches the bus: a model not found, a reward that cannot be imported)."""
    if obs.progress and obs.progress.failed:
        return obs.progress.failed
    condition = (_job_condition(obs.learner or {}, "Failed")
                 or _job_condition(obs.learner or {}, "FailureTarget") or {})
    failed = condition.get("message") or condition.get("reason") or "the learner Job failed"
    said = container_said(obs.pods, "learner")
    return f"{failed}; the learner said: {said}" if said else failed


def learner_action(obs: Observed, previous_phase: str = "") -> Action:
    """What to do about the learner: nothing, recreate it (from its checkpoint), or give up."""
    if obs.spec is None or obs.spec.suspend or obs.hold_reason or previous_phase in TERMINAL:
        return "none"
    if learner_state(obs.learner, obs.spec.learner.nodes) != "failed":
        return "none"
    return "restart" if obs.restarts < obs.spec.learner.backoff_limit else "fail"


# ---------------------------------------------------------------------------------------------
# Phase and conditions


@dataclass(frozen=True)
class Verdict:
    phase: str
    reason: str
    message: str


def problem(obs: Observed) -> Optional[Problem]:
    """Why pods are not coming up: an unbound volume when pods cannot be scheduled (or it is lost;
    Pending alone is normal before the first pod is scheduled), else the most telling pod problem."""
    pods, claims = pod_problem(obs.pods), claim_problem(obs.claims)
    if claims and (claims.reason == "VolumeLost" or (pods is not None and pods.reason == "Unschedulable")):
        return claims
    return pods


def stalled(obs: Observed, previous: dict[str, Any]) -> bool:
    """A running job whose step has not advanced for spec.progressDeadlineSeconds (not one that
    is being suspended)."""
    deadline = obs.spec.progress_deadline_seconds if obs.spec else None
    since = parse_timestamp(previous.get("lastProgressTime", ""))
    if deadline is None or since is None or previous.get("phase") != "Running":
        return False
    if obs.spec.suspend or obs.hold_reason:  # stopped on purpose (by the user or by Kueue)
        return False
    return _step(obs) <= previous.get("step", 0) and obs.now >= since + timedelta(seconds=deadline)


def verdict(obs: Observed, previous: dict[str, Any]) -> Verdict:
    """The phase, with the reason and message its conditions carry."""
    before = previous.get("phase", "")
    if obs.spec is None:
        return Verdict("Failed", "SpecInvalid", obs.spec_error or "the spec does not validate")
    if is_finished(previous):
        condition = _condition(previous, "Succeeded" if before == "Succeeded" else "Failed") or {}
        return Verdict(before, condition.get("reason", before), condition.get("message", ""))
    spec = obs.spec
    state = learner_state(obs.learner, spec.learner.nodes)
    if state == "succeeded" or (obs.progress is not None and obs.progress.done):
        return Verdict("Succeeded", "Completed", f"trained {_step(obs)} steps")
    if state == "failed" and not spec.suspend and obs.restarts >= spec.learner.backoff_limit:
        return Verdict("Failed", "BackoffLimitExceeded",
                       f"the learner failed after {obs.restarts} restarts "
                       f"(learner.backoffLimit {spec.learner.backoff_limit}): {learner_failure(obs)}")
    if spec.fail_on_stall and stalled(obs, previous):
        return Verdict("Failed", "ProgressDeadlineExceeded", _stall_message(obs))
    if spec.suspend:
        return Verdict("Suspended", "Suspended", "suspended: learner and generators scaled to zero")
    if obs.hold_reason:
        return Verdict("Suspended", obs.hold_reason, obs.hold_message)
    if state in ("failed", "deleting", "absent") and before == "Running":
        return Verdict("Running", "LearnerRestarting",
                       f"restarting the learner from its checkpoint ({obs.restarts} restarts)")
    if state == "running" or (state == "pending" and obs.progress is not None and before == "Running"):
        return Verdict("Running", "Training", f"step {_step(obs)}/{spec.learner.total_steps}")
    found = problem(obs)
    if found:
        return Verdict("Pending", found.reason, found.message)
    return Verdict("Pending", "Starting", "waiting for the learner pods")


def _stall_message(obs: Observed) -> str:
    return (f"the learner's step has not advanced from {_step(obs)} for progressDeadlineSeconds "
            f"({obs.spec.progress_deadline_seconds}s)")


def _step(obs: Observed) -> int:
    return obs.progress.step if obs.progress else 0


def _condition(status: dict[str, Any], kind: str) -> Optional[dict[str, Any]]:
    for condition in status.get("conditions") or []:
        if condition.get("type") == kind:
            return condition
    return None


def is_finished(status: dict[str, Any]) -> bool:
    """Succeeded or Failed for good: not a SpecInvalid failure, which ends when the spec is fixed."""
    return status.get("phase") in TERMINAL and _failed_reason(status) != "SpecInvalid"


def _failed_reason(status: dict[str, Any]) -> str:
    return (_condition(status, "Failed") or {}).get("reason", "")


def _ready(obs: Observed, v: Verdict) -> tuple[bool, str, str]:
    if v.phase != "Running":
        return False, v.reason, v.message
    if v.reason != "Training":
        return False, v.reason, v.message
    want = obs.spec.generator.replicas if obs.spec else 0
    ready = (obs.generators or {}).get("readyReplicas", 0) or 0
    found = problem(obs)
    if found:
        return False, found.reason, found.message
    if ready < want:
        return False, "GeneratorsNotReady", f"{ready}/{want} generators ready"
    return True, "AllReady", f"learner and {ready} generators ready"


def conditions(obs: Observed, v: Verdict, previous: dict[str, Any]) -> list[dict[str, Any]]:
    ready, ready_reason, ready_message = _ready(obs, v)
    active = v.phase in ("Pending", "Running")
    wanted = {
        "Ready": (ready, ready_reason, ready_message),
        "Progressing": (active, v.reason, v.message),
        "Suspended": (v.phase == "Suspended", v.reason if v.phase == "Suspended" else "NotSuspended",
                      v.message if v.phase == "Suspended" else ""),
        "Succeeded": (v.phase == "Succeeded", v.reason if v.phase == "Succeeded" else "NotSucceeded",
                      v.message if v.phase == "Succeeded" else ""),
        "Failed": (v.phase == "Failed", v.reason if v.phase == "Failed" else "NotFailed",
                   v.message if v.phase == "Failed" else ""),
        "SpecInvalid": (obs.spec is None, "InvalidField" if obs.spec is None else "Valid",
                        obs.spec_error if obs.spec is None else ""),
        "Stalled": _stalled_condition(obs, v, previous),
    }
    result = []
    for kind, (value, reason, message) in wanted.items():
        old = _condition(previous, kind)
        if kind in SHOWN_ONCE_TRUE and not value and old is None:
            continue
        status = "True" if value else "False"
        changed = old is None or old.get("status") != status
        result.append({
            "type": kind, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": timestamp(obs.now) if changed else old.get("lastTransitionTime")
            or timestamp(obs.now),
        })
    return result


def _stalled_condition(obs: Observed, v: Verdict, previous: dict[str, Any]) -> tuple[bool, str, str]:
    if v.reason == "ProgressDeadlineExceeded" or (v.phase == "Running" and stalled(obs, previous)):
        return True, "ProgressDeadlineExceeded", _stall_message(obs)
    return False, "Progressing", ""


# ---------------------------------------------------------------------------------------------
# The whole status


def _fresh(report: GeneratorStatus, now: datetime) -> bool:
    return report.fresh(now.timestamp())


def progress_fields(obs: Observed) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if obs.progress:
        p = obs.progress
        fields.update(step=p.step, policyVersion=p.policy_version, stalenessMean=p.staleness_mean,
                      stalenessMax=p.staleness_max, rolloutsConsumed=p.rollouts_consumed,
                      rolloutsDropped=p.rollouts_dropped, rewardMean=p.reward_mean)
        if p.last_snapshot:
            fields["lastSnapshot"] = p.last_snapshot
    fresh = [r for r in obs.reports if _fresh(r, obs.now)]
    fields["generatorVersions"] = {r.generator_id: r.policy_version for r in fresh}
    fields["rolloutsProduced"] = sum(r.rollouts for r in obs.reports)
    fields["tokensPerSecond"] = round(sum(r.tokens_per_second for r in fresh), 3)
    if obs.spec is not None:
        ready = (obs.generators or {}).get("readyReplicas", 0) or 0
        fields.update(totalSteps=obs.spec.learner.total_steps, replicas=ready,
                      generators=f"{ready}/{obs.spec.generator.replicas}", selector=obs.generator_selector)
    return fields


def _progress_time(obs: Observed, previous: dict[str, Any], phase: str) -> Optional[str]:
    """When the step last advanced (first: when the job started running)."""
    if phase != "Running":
        return previous.get("lastProgressTime")
    # (re)started: a suspension or a wait in Kueue's queue is not a stall
    if "lastProgressTime" not in previous or previous.get("phase") != "Running" or _step(obs) > previous.get("step", 0):
        return timestamp(obs.now)
    return previous["lastProgressTime"]


OPERATOR_KEYS = ("phase", "conditions", "observedGeneration", "restarts")


def compute_status(obs: Observed, previous: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The new `.status`: phase, conditions, observedGeneration, progress and times.

    Progress fields are carried over from the previous status while the bus has nothing newer
    (a learner restarting, the bus briefly away), so the view never jumps back to zero.
    """
    previous = previous or {}
    v = verdict(obs, previous)
    status = {k: val for k, val in previous.items() if k not in OPERATOR_KEYS and val is not None}
    status.update({k: val for k, val in progress_fields(obs).items() if val is not None})
    if obs.progress is not None and obs.progress.reward_mean is None:
        status.pop("rewardMean", None)
    status.update(
        phase=v.phase,
        conditions=conditions(obs, v, previous),
        observedGeneration=obs.generation,
        restarts=obs.restarts,
    )
    if v.phase == "Running" and "startTime" not in status:
        status["startTime"] = timestamp(obs.now)
    if obs.spec is not None:
        status["progress"] = f"{status.get('step', 0)}/{obs.spec.learner.total_steps}"
    if _progress_time(obs, previous, v.phase):
        status["lastProgressTime"] = _progress_time(obs, previous, v.phase)
    if v.phase in TERMINAL and "completionTime" not in status:
        status["completionTime"] = timestamp(obs.now)
    if v.phase not in TERMINAL:
        status.pop("completionTime", None)
    api.JobStatus.model_validate(status)  # the shape the CRD's status schema was generated from
    return status


def status_patch(previous: Optional[dict[str, Any]], new: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch from the previous status to the new one (null deletes a key)."""
    previous = previous or {}
    patch: dict[str, Any] = {key: None for key in previous if key not in new}
    for key, val in new.items():
        old = previous.get(key)
        if isinstance(old, dict) and isinstance(val, dict):
            if old != val:
                patch[key] = status_patch(old, val)  # maps merge: removed keys need a null
        elif old != val:
            patch[key] = val
    return patch


def ttl_expired(spec: Optional[api.JobSpec], status: dict[str, Any], now: datetime) -> bool:
    """Whether a finished job has outlived spec.ttlSecondsAfterFinished."""
    if spec is None or spec.ttl_seconds_after_finished is None or status.get("phase") not in TERMINAL:
        return False
    finished = parse_timestamp(status.get("completionTime", ""))
    return finished is not None and now >= finished + timedelta(seconds=spec.ttl_seconds_after_finished)
