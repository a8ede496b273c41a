"""The base of every spec model, and the literals several sections share.

One base class so every section parses the same way: camelCase aliases (the YAML and the CRD
spell fields in camelCase), snake_case in Python, unknown fields rejected (a typo must not pass
silently), defaults validated like given values.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

LossName = Literal["online-dpo", "ppo", "rloo", "proximal-rloo", "grpo", "tb", "best-of-n-sft"]
BUILTIN_MODEL_PREFIX = "builtin:"


class SpecModel(BaseModel):
    """Base: camelCase aliases, unknown fields rejected (typos must not pass silently)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_default=True
    )
