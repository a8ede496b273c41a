"""The base of every spec model, and the literals several sections share.

One base class so every section parses the same way: camelCase aliases (the YAML and the CRD
spell fields in camelCase), snake_case in Python, unknown fields rejected (a typo must not pass
silently), defaults validated like given values, every float finite and every string bounded
(`STR_MAX_LENGTH` unless the field says otherwise; the bound reaches the CRD as `maxLength`).

The patterns below are shared by several sections; each has a plain-words description in
`PATTERN_HINTS`, which error messages quote instead of the regular expression. They use only
what pydantic (Rust regex), the apiserver (Go RE2) and Python's `re` all read the same way.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

LossName = Literal["online-dpo", "ppo", "rloo", "proximal-rloo", "grpo", "tb", "best-of-n-sft"]
BUILTIN_MODEL_PREFIX = "builtin:"
STR_MAX_LENGTH = 4096  # any string field without a bound of its own (a 1 MiB value is a mistake or an attack)

# A DNS-1123 label (namespaces: they become NATS subject tokens, so no '.', '*' or '>') and a
# DNS-1123 subdomain (names of Secrets, PVCs, storage classes), each also allowed empty where the
# field says "empty = default".
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
DNS_SUBDOMAIN_OR_EMPTY = r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A path of plain segments, relative or absolute: no '.' or '..' segment (nothing outside what it
# names), no '\', no whitespace or control characters. Hub ids ("org/name") are such paths too.
_SEGMENT = r"\.{0,2}[A-Za-z0-9_+=@-][A-Za-z0-9_.+=@-]*"
_PATH = rf"/?{_SEGMENT}(/{_SEGMENT})*"
MODEL_REF = rf"^$|^builtin:[a-z0-9][a-z0-9-]*$|^{_PATH}/?$"
PROMPT_FILE = rf"^$|^{_PATH}\.(jsonl|json|parquet|csv)$"
# An OCI image reference: [registry[:port]/]path[:tag][@digest], as the distribution library reads it.
_DOMAIN = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*(:[0-9]{1,5})?"
_IMAGE_PATH = r"[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*(/[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*)*"
IMAGE = (rf"^({_DOMAIN}/)?{_IMAGE_PATH}(:[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?"
         r"(@[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$")
# NATS server URLs, comma-separated; no user:password@ (credentials come from a Secret, never the spec).
_NATS_SERVER = r"(nats|tls|ws|wss)://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?"
NATS_URL = rf"^$|^{_NATS_SERVER}(,{_NATS_SERVER})*$"

PATTERN_HINTS: dict[str, str] = {
    DNS_LABEL: "a DNS-1123 label: lower-case letters, digits and '-', at most 63, starting and ending "
    "with a letter or digit",
    DNS_SUBDOMAIN_OR_EMPTY: "empty, or a Kubernetes object name (lower-case letters, digits, '-' and '.')",
    MODEL_REF: "a hub id (org/name), a path without '.' or '..' segments, or builtin:<name>",
    PROMPT_FILE: "a path without '.' or '..' segments ending in .jsonl, .json, .parquet or .csv",
    IMAGE: "an image reference such as ghcr.io/org/image:tag (lower-case path, optional @sha256:digest)",
    NATS_URL: "empty, or nats://host:port (several separated by commas; tls://, ws://, wss:// too; no "
    "user:password@: name a credentialsSecret)",
}


def json_problems(value: Any, path: str = "") -> list[str]:
    """Where a free-form value (a pod template's spec) is not plain JSON: a non-finite number or a
    key that is not a string (YAML allows both; the apiserver and a round trip through JSON do not)."""
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{path or '(value)'}: {value} is not a finite number"]
    if isinstance(value, dict):
        found = [f"{path}.{key!r}: keys must be strings" for key in value if not isinstance(key, str)]
        return found + [p for key, item in value.items() for p in json_problems(item, f"{path}.{key}".strip("."))]
    if isinstance(value, (list, tuple)):
        return [p for i, item in enumerate(value) for p in json_problems(item, f"{path}[{i}]")]
    return []


class SpecModel(BaseModel):
    """Base: camelCase aliases, unknown fields rejected (typos must not pass silently)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_default=True,
        allow_inf_nan=False, str_max_length=STR_MAX_LENGTH,
    )
