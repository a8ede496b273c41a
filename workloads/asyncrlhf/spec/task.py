"""The spec's `model` and `task` sections: which weights are trained, on which prompts, scored how."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import MODEL_REF, PROMPT_FILE, SpecModel
from .pods import ModelCacheSpec, SecretKey


class ModelSpec(SpecModel):
    """Which weights are trained, which are the frozen reference, and how they are loaded."""

    policy: str = Field(
        "builtin:tiny-sort",
        description="Policy to train: a Hugging Face hub id, a path on a mounted volume, or "
        "'builtin:tiny-sort' (a tiny Llama built locally, for the built-in task).",
        min_length=1, max_length=1024, pattern=MODEL_REF,
    )
    reference: str = Field(
        "", description="Frozen reference policy for the KL terms; empty means the initial policy.",
        max_length=1024, pattern=MODEL_REF,
    )
    tokenizer: str = Field(
        "", description="Tokenizer id or path; empty means the policy's.", max_length=1024, pattern=MODEL_REF
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Parameter dtype for generation and training (bfloat16 on GPUs)."
    )
    chat_template: str = Field(
        "auto", max_length=65536,
        description="How a prompt becomes tokens. 'auto': a prompt that is a list of chat messages is "
        "rendered with the tokenizer's chat template (with the generation prompt); a text prompt is BOS + "
        "text. 'none': never a template (a message list's contents are joined by blank lines). Anything "
        "else is an inline Jinja chat template used for every prompt (a text prompt becomes one user "
        "message). Generators encode with it and the learner trains on the same tokens; reward models "
        "render prompt + answer with their own tokenizer's template.",
    )
    token_secret: SecretKey = Field(
        default_factory=SecretKey,
        description="Secret key holding a Hugging Face token (HF_TOKEN in every pod), for gated models.",
    )
    cache: ModelCacheSpec = Field(
        default_factory=ModelCacheSpec, description="Where downloaded models are kept (the HF cache).",
    )


class PromptSource(SpecModel):
    """Where prompts come from, and which columns of a record are the prompt and the answer."""

    source: Literal["builtin", "dataset", "file"] = Field(
        "builtin", description="builtin: a toy task shipped with asyncrlhf; dataset: a Hugging Face "
        "dataset (hub id or a local dataset directory); file: a JSONL, JSON, Parquet or CSV file on a "
        "mounted volume."
    )
    name: str = Field(
        "sort-digits", max_length=1024, pattern=MODEL_REF,
        description="builtin task name (sort-digits) or dataset id/directory."
    )
    path: str = Field(
        "", max_length=1024, pattern=PROMPT_FILE, description="File path (source=file); its extension names the format: .jsonl, .json, "
        ".parquet or .csv.",
    )
    config: str = Field(
        "", max_length=253,
        description="Dataset configuration (subset) name, e.g. 'main' for openai/gsm8k (source=dataset).",
    )
    revision: str = Field(
        "", max_length=253, description="Dataset revision: a branch, tag or commit (source=dataset)."
    )
    data_files: list[str] = Field(
        default_factory=list, max_length=256,
        description="Files of the dataset to load, names or glob patterns inside it (source=dataset); "
        "empty = the configuration's own files.",
    )
    split: str = Field(
        "train", description="Split (source=dataset; a file is one split), slices allowed: 'train[:1000]'."
    )
    field: str = Field(
        "prompt", description="Column that holds the prompt: text, or a list of {role, content} messages."
    )
    messages_field: str = Field(
        "", description="Column that holds the prompt as a list of {role, content} chat messages; "
        "when set it is used instead of `field`.",
    )
    answer_field: str = Field(
        "answer",
        description="Column with the reference answer, given to rule verifiers and reward functions "
        "(as `answer`). Every column of the record reaches python and http rewards under its own name.",
    )


class OnePassHead(SpecModel):
    """Online one-pass reward head (Li et al. 2025) over a frozen model's features."""

    feature_model: str = Field(
        "", max_length=1024, pattern=MODEL_REF,
        description="Frozen model whose last-layer embedding is the feature map; empty = policy.",
    )
    lambda_: float = Field(1.0, alias="lambda", gt=0, le=1e6, description="Initial Hessian λI.")
    bound: float = Field(10.0, gt=0, le=1e6, description="Projection radius B on the head's norm.")
    eta: float = Field(1.0, gt=0, le=1e6, description="Mirror-descent step size η.")
    exploration_bonus: float = Field(
        1.0, ge=0, le=1e6,
        description="ν of deployment-time adaptation: the second answer maximises estimated reward + "
        "ν ‖φ(a′) − φ(a)‖ in the H⁻¹ norm (0 = the runner-up by reward).",
    )


# Where generator pods mount `task.reward.codeConfigMap` (cluster); python rewards import from it.
REWARD_CODE_DIR = "/opt/asyncrlhf/reward-code"
_FUNCTION = r"^$|^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class HttpAuth(SpecModel):
    """The credential an http reward sends: an environment variable's value, set from a Secret on a cluster."""

    env: str = Field(
        "ASYNCRLHF_REWARD_TOKEN", pattern=_ENV_NAME, max_length=253,
        description="Environment variable holding the credential (export it for local runs); unset or "
        "empty = no auth header.",
    )
    secret: SecretKey = Field(
        default_factory=SecretKey,
        description="Secret key with the credential (cluster): generator pods get `env` from it.",
    )
    header: str = Field("Authorization", min_length=1, max_length=253, description="HTTP header to send.")
    scheme: str = Field(
        "Bearer", max_length=64,
        description="Prefix of the header value ('Bearer' sends 'Bearer <token>'); empty = the token alone.",
    )


class HttpReward(SpecModel):
    """A reward server: batched JSON POST {prompts, completions, columns} -> {rewards} (docs/algorithms.md)."""

    url: str = Field(
        "", max_length=2048, pattern=r"^$|^https?://",
        description="Endpoint the batch is POSTed to (http:// or https://).",
    )
    timeout_seconds: float = Field(30.0, gt=0, le=3600, description="Timeout of one request.")
    retries: int = Field(
        3, ge=0, le=20,
        description="Retries of a failed request (connection error, timeout, HTTP 429 or 5xx), "
        "with exponential backoff; then the batch's prompts are handed back and retried later.",
    )
    batch_size: int = Field(
        0, ge=0, le=65536, description="Completions per request; 0 = a generator's whole batch in one."
    )
    auth: HttpAuth = Field(default_factory=HttpAuth, description="Auth header from a Secret.")


class RewardSource(SpecModel):
    """The settings of each kind of reward (used by `kind` and by the terms of kind=sum)."""

    rule: str = Field("sort-digits", description="Verifier name for kind=rule (sort-digits, gsm8k).")
    model: str = Field(
        "", max_length=1024, pattern=MODEL_REF, description="Reward model id or path for kind=model."
    )
    function: str = Field(
        "", max_length=512, pattern=_FUNCTION,
        description="kind=python: 'package.module:name' of a batched reward function "
        "f(prompts, completions, **columns) -> list of floats, importable from PYTHONPATH, the job "
        "file's directory (local runs) or codeConfigMap (cluster).",
    )
    function_timeout_seconds: float = Field(
        60.0, gt=0, le=3600,
        description="kind=python: longest one call of the function may take; past it the batch's prompts "
        "go back to the queue (retried) and the call is abandoned.",
    )
    http: HttpReward = Field(default_factory=HttpReward, description="Settings for kind=http.")


class RewardTerm(RewardSource):
    """One term of a kind=sum reward: weight x the term's reward."""

    kind: Literal["rule", "model", "python", "http"] = Field("rule", description="The term's kind.")
    weight: float = Field(1.0, ge=-1e6, le=1e6, description="Weight of the term in the sum.")


class RewardSpec(RewardSource):
    """How a completion is scored."""

    kind: Literal["rule", "model", "python", "http", "onepass", "sum"] = Field(
        "rule", description="rule: a programmatic verifier; model: a sequence-classification "
        "reward model; python: your function; http: your reward server; onepass: a linear head "
        "learned online from preferences; sum: a weighted sum of `terms`."
    )
    code_config_map: str = Field(
        "", max_length=253,
        description=f"ConfigMap holding python reward modules (cluster): mounted at {REWARD_CODE_DIR} "
        "in generator pods, where python rewards import from.",
    )
    terms: list[RewardTerm] = Field(
        default_factory=list, max_length=16, description="The weighted terms of kind=sum."
    )
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
        -1.0, ge=-1e6, le=1e6,
        description="Score given to completions that end without EOS (paper: -1 TL;DR, -10 chatbot).",
    )

    def sources(self) -> list[RewardSource]:
        """Every reward this spec runs: itself, or the terms of a sum."""
        return list(self.terms) if self.kind == "sum" else [self]

    def http_rewards(self) -> list[HttpReward]:
        """The reward servers the generators call (the operator opens egress to them and sets
        each `auth.env` from its Secret)."""
        kinds = [(t.kind, t.http) for t in self.terms] if self.kind == "sum" else [(self.kind, self.http)]
        return [http for kind, http in kinds if kind == "http"]


class TaskSpec(SpecModel):
    """Prompts and reward."""

    prompts: PromptSource = Field(default_factory=PromptSource, description="Prompt source.")
    reward: RewardSpec = Field(default_factory=RewardSpec, description="Reward function.")
