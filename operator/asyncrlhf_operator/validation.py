"""Validate a job object with the pydantic models and say which field is wrong.

The CRD schema and its CEL rules reject most invalid specs at admission; this is the second
line (an old CRD installed, a rule CEL cannot express): the job then fails with a condition
naming the field, e.g. `spec.async.maxStaleness: ...`.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

import pydantic

from asyncrlhf import api

# What the immutable fields were when the operator took the job in (JSON, on the job itself).
IMMUTABLE_ANNOTATION = f"{api.GROUP}/immutable-fields"


def recorded_immutables(job: api.AsyncRLHFJob) -> str:
    return json.dumps(api.immutable_values(job.spec), sort_keys=True, separators=(",", ":"))


def validate(body: Mapping[str, Any]) -> tuple[Optional[api.AsyncRLHFJob], str]:
    """(the job, "") or (None, "<field path>: <what is wrong>"), including an immutable field that
    changed since the operator recorded it (a CRD with its transition rules rejects that first)."""
    job, error = validate_spec(body)
    if job is None:
        return job, error
    error = foreign_bus_error(job.spec.nats)
    if error:
        return None, error
    error = token_conflict(job)
    if error:
        return None, error
    recorded = ((body.get("metadata") or {}).get("annotations") or {}).get(IMMUTABLE_ANNOTATION)
    if recorded:
        try:
            before = json.loads(recorded)
        except ValueError:
            before = {}
        now = api.immutable_values(job.spec)
        for path in api.IMMUTABLE_FIELDS:
            if path in before and before[path] != now[path]:
                return None, (f"spec.{path}: {api.IMMUTABLE_MESSAGE}; it was "
                              f"{json.dumps(before[path], sort_keys=True)}")
    return job, ""


def token_conflict(job: api.AsyncRLHFJob) -> str:
    """HF_TOKEN set both by model.tokenSecret and by a pod template: say which to remove."""
    if not job.spec.model.token_secret.name:
        return ""
    for role in ("generator", "learner"):
        for i, container in enumerate(getattr(job.spec, role).pod_template.spec.get("containers") or []):
            for j, var in enumerate(container.get("env") or []):
                if var.get("name") == "HF_TOKEN":
                    return (f"spec.{role}.podTemplate.spec.containers[{i}].env[{j}]: HF_TOKEN comes from "
                            "spec.model.tokenSecret; remove one of the two")
    return ""


def foreign_bus_error(nats: api.NatsSpec) -> str:
    """A job that names its own bus must bring its own credentials: the operator's NATS credentials
    go to the operator's bus only (a job's URL could be anyone's server, collecting passwords)."""
    if nats.url and not nats.credentials_secret:
        return (f"spec.nats.credentialsSecret: this job names its own bus (spec.nats.url {nats.url!r}), so it "
                "needs a Secret with that bus's credentials (key 'creds', or 'user' and 'password'); the "
                "operator sends its own credentials only to its own bus (leave spec.nats.url empty to use it)")
    return ""


def validate_spec(body: Mapping[str, Any]) -> tuple[Optional[api.AsyncRLHFJob], str]:
    """The spec alone against the pydantic models."""
    meta = body.get("metadata") or {}
    manifest = {
        "apiVersion": body.get("apiVersion", api.API_VERSION),
        "kind": body.get("kind", api.KIND),
        "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace") or "default"},
        "spec": dict(body.get("spec") or {}),
    }
    try:
        return api.AsyncRLHFJob.model_validate(manifest), ""
    except pydantic.ValidationError as err:
        return None, describe(err)


def deletion_view(body: Mapping[str, Any]) -> tuple[api.NatsSpec, api.WeightSyncSpec]:
    """What deleting a job needs from its spec (its bus, its volume), defaults from the models.

    Taken from the validated job; a job whose spec does not validate (rejected as SpecInvalid,
    or edited past an old CRD) must still be cleaned up, so its two sections are then read as
    given (`model_construct`: no validation, the models' defaults for what is missing)."""
    job, _ = validate_spec(body)
    if job is not None:
        nats, sync = job.spec.nats, job.spec.weight_sync
    else:
        spec = body.get("spec") or {}
        raw_nats, raw_sync = (spec.get(key) if isinstance(spec.get(key), dict) else {}
                              for key in ("nats", "weightSync"))
        nats, sync = api.NatsSpec.model_construct(**raw_nats), api.WeightSyncSpec.model_construct(**raw_sync)
    if foreign_bus_error(nats):
        # Refused as SpecInvalid, it never made anything on that bus (and the operator's credentials
        # must not go there): whatever it has is on the operator's own bus, from before the edit.
        nats = nats.model_copy(update={"url": ""})
    return nats, sync


def describe(err: pydantic.ValidationError) -> str:
    """The first error as `<path>: <message>`; cross-field errors name their own field."""
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "string_pattern_mismatch" and "KMGTPE" in str((first.get("ctx") or {}).get("pattern")):
        message = f"{first['input']!r} is not a Kubernetes quantity (write e.g. 500m, 4Gi, 20Gi)"
    for rule in api.CROSS_FIELD_RULES:
        if message.startswith(f"{rule.path}: "):
            return f"spec.{rule.path}: {message[len(rule.path) + 2:]}"
    return f"{where}: {message}" if where else message
