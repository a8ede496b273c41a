"""Reading job manifests: YAML in, a validated AsyncRLHFJob out, or errors a person can act on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .api import AsyncRLHFJob

EXIT_BAD_INPUT = 2  # the exit code of every command given a bad manifest or environment


class ManifestError(ValueError):
    """A manifest that cannot be used; `problems` lists 'path: what is wrong' lines."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source, self.problems = source, problems
        super().__init__(f"{source}: invalid AsyncRLHFJob manifest\n" + "\n".join(f"  - {p}" for p in problems))


def _path(loc: tuple) -> str:
    parts = [str(p) for p in loc if not (isinstance(p, str) and p.startswith("function-"))]
    return ".".join(parts) or "(document)"


def format_errors(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        where = _path(e["loc"])
        if ": " in msg and e["type"] == "value_error" and msg.split(": ", 1)[0].count(".") >= 1:
            problems.append(f"{where}.{msg}")  # cross-field rules name their own field
            continue
        got = e.get("input")
        shown = "" if e["type"] in ("missing", "extra_forbidden") or isinstance(got, (dict, list)) else f" (got {got!r})"
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check spelling; fields are camelCase)"
        problems.append(f"{where}: {msg}{shown}")
    return problems


def parse_manifest(data: Any, source: str = "<manifest>") -> AsyncRLHFJob:
    if not isinstance(data, dict):
        raise ManifestError(source, ["the document must be a mapping with apiVersion, kind, metadata, spec"])
    try:
        return AsyncRLHFJob.model_validate(data)
    except ValidationError as err:
        raise ManifestError(source, format_errors(err)) from None


def load_manifest(path: str | Path) -> AsyncRLHFJob:
    """Load the (first AsyncRLHFJob in the) YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(str(path), ["file not found"])
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as err:
        raise ManifestError(str(path), [f"not valid YAML: {err}"]) from None
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == "AsyncRLHFJob"]
    if not jobs:
        raise ManifestError(str(path), ["no document with kind: AsyncRLHFJob"])
    return parse_manifest(jobs[0], str(path))


def dump_manifest(job: AsyncRLHFJob) -> str:
    return yaml.safe_dump(job.to_manifest(), sort_keys=False)
