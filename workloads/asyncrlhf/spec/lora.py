"""The spec's `learner.lora` section: train a low-rank adapter instead of every weight (PEFT).

Off by default. With it on, the learner trains only the adapter's matrices, the reference is the
base model with the adapter switched off (no second copy), and snapshots carry only the adapter:
docs/lora.md has what that costs and saves at 1B/8B/70B.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints, field_validator

from .base import SpecModel

ALL_LINEAR = "all-linear"  # PEFT's name for every linear layer but the output head
# a module name (q_proj), a dotted path's tail (self_attn.q_proj) or PEFT's "all-linear"
MODULE_NAME = r"^[A-Za-z_][A-Za-z0-9_.-]*$"
ModuleName = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=MODULE_NAME)]


class LoraSpec(SpecModel):
    """A LoRA adapter on the policy (PEFT): W + (alpha / rank) * B A on each target module."""

    enabled: bool = Field(False, description="Train a LoRA adapter instead of the whole policy.")
    rank: int = Field(16, ge=1, le=512, description="Rank r of the adapter's matrices (vLLM serves up to 512).")
    alpha: float = Field(32.0, gt=0, le=65536, description="Scale numerator: the update is (alpha / rank) * B A.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input while training.")
    target_modules: list[ModuleName] = Field(
        [ALL_LINEAR], min_length=1, max_length=64,
        description="Modules that get an adapter: names such as q_proj, v_proj (a module matches when its "
        "name ends with one), or 'all-linear' (every linear layer but the output head).",
    )

    @field_validator("target_modules")
    @classmethod
    def _all_linear_alone(cls, value: list[str]) -> list[str]:
        if ALL_LINEAR in value and len(value) > 1:
            raise ValueError(f"'{ALL_LINEAR}' already names every linear layer: give it alone, or list module "
                             f"names without it (got {value})")
        return value
