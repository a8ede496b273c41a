"""Reading job manifests: YAML in, a validated AsyncRLHFJob out, or errors a person can act on.

Every problem of a manifest is reported at once, each as `<field path>: <what is wrong and what to
do> (got <value>)`: field errors, missing required fields (`api.REQUIRED_FIELDS`) and the
cross-field rules. Pydantic checks the rules only once every field is valid, so when some fields
are wrong the rules are checked again on the manifest without them (their defaults stand in),
and a rule is reported only when none of the fields it reads was wrong — never a rule broken by a
stand-in. Whatever the file holds (any YAML, any size, anchors that expand to millions of nodes,
nesting deeper than Python's stack), the outcome is a job or a ManifestError, never a traceback.
"""

from __future__ import annotations

import copy
import difflib
import re
import typing
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml
from pydantic import BaseModel, ValidationError

from .api import CROSS_FIELD_RULES, AsyncRLHFJob, REQUIRED_MESSAGE, missing_required
from .spec.base import PATTERN_HINTS

EXIT_BAD_INPUT = 2  # the exit code of every command given a bad manifest or environment
MAX_FILE_BYTES = 2 << 20  # past Kubernetes' own limit for an object (1.5 MiB in etcd)
MAX_NODES = 200_000  # values in the document, counting each expansion of a YAML alias
SHOWN_VALUE_CHARS = 80
_CEL_FUNCTIONS = {"all", "exists", "exists_one", "size", "startsWith", "endsWith", "contains", "matches"}


class ManifestError(ValueError):
    """A manifest that cannot be used; `problems` lists 'path: what is wrong' lines."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source, self.problems = source, problems
        super().__init__(f"{source}: invalid AsyncRLHFJob manifest\n" + "\n".join(f"  - {p}" for p in problems))


# ---------------------------------------------------------------------------------------------
# Error messages


def _path(loc: Iterable[Any]) -> str:
    parts = [str(p) for p in loc if not (isinstance(p, str) and p.startswith("function-"))]
    return ".".join(parts) or "(document)"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN_VALUE_CHARS else f"{text[:SHOWN_VALUE_CHARS]}... ({len(text)} characters)"


def _reason(error: dict[str, Any]) -> str:
    """What is wrong, said so that it also says what to do."""
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown field (check spelling; fields are camelCase)" + _suggestion(error["loc"])
    if kind == "string_pattern_mismatch" and ctx.get("pattern") in PATTERN_HINTS:
        return f"must be {PATTERN_HINTS[ctx['pattern']]}"
    if kind == "finite_number":
        return "must be a finite number (not .inf or .nan)"
    if kind == "int_parsing_size":
        return "is far too large for this field"
    if kind == "missing":
        return "required: set it"
    return error["msg"].removeprefix("Value error, ")


def _problem(error: dict[str, Any], prefix: tuple = ()) -> str:
    got = error.get("input")
    hide = error["type"] in ("missing", "extra_forbidden") or isinstance(got, (dict, list))
    return f"{_path(prefix + tuple(error['loc']))}: {_reason(error)}{'' if hide else f' (got {_shown(got)})'}"


def _model_of(annotation: Any) -> Optional[type[BaseModel]]:
    """The pydantic model inside an annotation (Optional[M], list[M], dict[str, M], M), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _suggestion(loc: tuple) -> str:
    """' (did you mean X?)' for an unknown field close to a known one at the same place."""
    model: Optional[type[BaseModel]] = AsyncRLHFJob
    for part in loc[:-1]:
        if model is None or isinstance(part, int):
            continue  # a list index or a dict key: the model stays that of the items
        field = next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
        model = _model_of(field.annotation) if field is not None else None
    if model is None:
        return ""
    known = [f.alias or n for n, f in model.model_fields.items()]
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    return f"; did you mean {close[0]}?" if close else ""


def format_errors(err: ValidationError, prefix: tuple = ()) -> list[str]:
    return [_problem(e, prefix) for e in err.errors()]


# ---------------------------------------------------------------------------------------------
# Cross-field rules when some fields are wrong


def _rule_fields(path: str, message: str) -> list[tuple[str, ...]]:
    """The fields (camelCase paths under spec) that the rule at `path` with `message` reads."""
    for rule in CROSS_FIELD_RULES:
        if rule.path == path and rule.message == message:
            chains = re.findall(r"self((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", rule.cel)
            fields = []
            for chain in chains:
                parts = tuple(chain.strip(".").split("."))
                while parts and parts[-1] in _CEL_FUNCTIONS:
                    parts = parts[:-1]
                fields.append(parts)
            return fields + [tuple(path.split("."))]
    return [tuple(path.split("."))]


def _overlaps(a: tuple, b: tuple) -> bool:
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def _drop(data: Any, loc: tuple) -> None:
    """Remove what `loc` points at (or the nearest whole value on its way) from `data`."""
    parent, key, node = None, None, data
    for part in loc:
        if isinstance(node, dict) and part in node:
            parent, key, node = node, part, node[part]
        else:
            break
        if isinstance(node, list):
            break  # a list is dropped whole: removing one item would shift the others' indices
    if isinstance(parent, dict):
        parent.pop(key, None)


def _rule_problems(data: dict[str, Any], errors: list[dict[str, Any]]) -> list[str]:
    """The cross-field rules broken by the fields that are valid, checked without the wrong ones."""
    wrong = [tuple(p for p in e["loc"][1:] if isinstance(p, str)) for e in errors
             if e["type"] != "cross_field" and e["loc"][:1] == ("spec",)]
    if not wrong or not isinstance(data.get("spec"), dict):
        return []
    repaired = copy.deepcopy(data)
    for error in errors:
        if error["type"] != "cross_field":
            _drop(repaired, tuple(error["loc"]))
    try:
        AsyncRLHFJob.model_validate(repaired)
        return []
    except ValidationError as err:
        again = err.errors()
    problems = []
    for error in again:
        if error["type"] != "cross_field":
            continue
        path = ".".join(str(p) for p in error["loc"][1:])
        if not any(_overlaps(field, w) for field in _rule_fields(path, error["msg"]) for w in wrong):
            problems.append(_problem(error))
    return problems


# ---------------------------------------------------------------------------------------------
# Parsing and loading


def _too_big(doc: Any) -> bool:
    """More than MAX_NODES values, counting every expansion of an alias (and cycles as endless)."""
    stack, seen = [doc], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_NODES:
            return True
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple, set)):
            stack.extend(node)
    return False


def parse_manifest(data: Any, source: str = "<manifest>") -> AsyncRLHFJob:
    """The job, or a ManifestError listing every problem (field path, what is wrong, what to do)."""
    if not isinstance(data, dict):
        raise ManifestError(source, ["the document must be a mapping with apiVersion, kind, metadata, spec"])
    if _too_big(data):
        raise ManifestError(source, [f"the document has more than {MAX_NODES} values (YAML anchors count "
                                     "each time they are used): a manifest is far smaller"])
    job: Optional[AsyncRLHFJob] = None
    problems = [f"{path}: {REQUIRED_MESSAGE}" for path in missing_required(data.get("spec"))]
    try:
        try:
            job = AsyncRLHFJob.model_validate(data)
        except ValidationError as err:
            errors = err.errors()
            problems += [_problem(e) for e in errors] + _rule_problems(data, errors)
    except RecursionError:
        problems.append("(document): nested too deeply for a manifest")
    if problems or job is None:
        raise ManifestError(source, _unique(problems))
    return job


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _read(path: Path) -> list[Any]:
    if not path.is_file():
        raise ManifestError(str(path), ["file not found"])
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ManifestError(str(path), [f"the file is larger than {MAX_FILE_BYTES >> 20} MiB: not a job manifest"])
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(str(path), [f"cannot be read as UTF-8 text: {err}"]) from None
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except (yaml.YAMLError, ValueError, OverflowError) as err:  # a date like 2024-13-45 is a ValueError
        raise ManifestError(str(path), [f"not valid YAML: {err}"]) from None
    except RecursionError:
        raise ManifestError(str(path), ["not valid YAML: nested too deeply"]) from None


def load_manifest(path: str | Path) -> AsyncRLHFJob:
    """Load the (first AsyncRLHFJob in the) YAML file."""
    path = Path(path)
    docs = _read(path)
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == "AsyncRLHFJob"]
    if not jobs:
        raise ManifestError(str(path), ["no document with kind: AsyncRLHFJob"])
    return parse_manifest(jobs[0], str(path))


def dump_manifest(job: AsyncRLHFJob) -> str:
    return yaml.safe_dump(job.to_manifest(), sort_keys=False)
