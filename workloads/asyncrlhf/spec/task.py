"""The spec's `model` and `task` sections: which weights are trained, on which prompts, scored how."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import SpecModel
from .pods import ModelCacheSpec, SecretKey


class ModelSpec(SpecModel):
    """Which weights are trained, which are the frozen reference, and how they are loaded."""

    policy: str = Field(
        "builtin:tiny-sort",
        description="Policy to train: a Hugging Face hub id, a path on a mounted volume, or "
        "'builtin:tiny-sort' (a tiny Llama built locally, for the built-in task).",
        min_length=1, max_length=1024,
    )
    reference: str = Field(
        "", description="Frozen reference policy for the KL terms; empty means the initial policy.",
        max_length=1024,
    )
    tokenizer: str = Field("", description="Tokenizer id or path; empty means the policy's.", max_length=1024)
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Parameter dtype for generation and training (bfloat16 on GPUs)."
    )
    token_secret: SecretKey = Field(
        default_factory=SecretKey,
        description="Secret key holding a Hugging Face token (HF_TOKEN in every pod), for gated models.",
    )
    cache: ModelCacheSpec = Field(
        default_factory=ModelCacheSpec, description="Where downloaded models are kept (the HF cache).",
    )


class PromptSource(SpecModel):
    """Where prompts come from."""

    source: Literal["builtin", "dataset", "file"] = Field(
        "builtin", description="builtin: a toy task shipped with asyncrlhf; dataset: a hub "
        "dataset id; file: a JSONL file on a mounted volume."
    )
    name: str = Field(
        "sort-digits", description="builtin task name (sort-digits) or hub dataset id."
    )
    path: str = Field("", description="JSONL file path (source=file).")
    split: str = Field("train", description="Dataset split (source=dataset).")
    field: str = Field("prompt", description="Record field that holds the prompt text.")
    answer_field: str = Field(
        "answer",
        description="Record field with the reference answer, passed to rule verifiers.",
    )


class OnePassHead(SpecModel):
    """Online one-pass reward head (Li et al. 2025) over a frozen model's features."""

    feature_model: str = Field(
        "",
        description="Frozen model whose last-layer embedding is the feature map; empty = policy.",
    )
    lambda_: float = Field(1.0, alias="lambda", gt=0, description="Initial Hessian λI.")
    bound: float = Field(10.0, gt=0, description="Projection radius B on the head's norm.")
    eta: float = Field(1.0, gt=0, description="Mirror-descent step size η.")


class RewardSpec(SpecModel):
    """How a completion is scored."""

    kind: Literal["rule", "model", "onepass"] = Field(
        "rule", description="rule: a programmatic verifier; model: a sequence-classification "
        "reward model; onepass: a linear head learned online from preferences."
    )
    rule: str = Field("sort-digits", description="Verifier name for kind=rule (sort-digits, gsm8k).")
    model: str = Field("", description="Reward model id or path for kind=model.")
    onepass: OnePassHead = Field(default_factory=OnePassHead, description="Settings for kind=onepass.")
    device: Literal["generator", "dedicated"] = Field(
        "generator",
        description="GPU of a reward or feature model (kind model/onepass) on a generator: 'generator' "
        "shares the generator's first GPU (vLLM keeps 1 - memoryFraction free for it); 'dedicated' "
        "takes the generator's last GPU (count it in generator.resources.gpus).",
    )
    batch_size: int = Field(
        16, ge=1, le=4096, description="Sequences per reward/feature-model forward pass."
    )
    no_eos_penalty: float = Field(
        -1.0,
        description="Score given to completions that end without EOS (paper: -1 TL;DR, -10 chatbot).",
    )


class TaskSpec(SpecModel):
    """Prompts and reward."""

    prompts: PromptSource = Field(default_factory=PromptSource, description="Prompt source.")
    reward: RewardSpec = Field(default_factory=RewardSpec, description="Reward function.")
