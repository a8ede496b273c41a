"""Every message that crosses the bus, as typed, versioned schemas.

One module so producers and consumers cannot disagree. Each schema carries `v` (its
version); a reader refuses a message whose version it does not know instead of guessing.
No pickle: messages are JSON, weights are safetensors files referenced by path. The one
exception to JSON is the rollout group, by far the largest message (K completions with a token id
and a log-prob per token): it travels as msgpack with its token ids packed as little-endian uint32
and its log-probs as float64 (`RolloutGroup.encode`): about 12 bytes a token plus the text instead
of ~31 in JSON, and about twice as fast to decode once completions are a few hundred tokens long
(slower below ~150: bench/results/bus.md). Its reader also takes the JSON form (a generator of an
earlier release), told apart by the first byte.

Values a reader would trip over are refused at decode, as a MessageError like any malformed
message: every float finite (a NaN score once turned every weight into NaN), lists and strings
bounded, token ids non-negative, one log-prob per token, at least one completion, and batches,
indices, versions and K within the largest a valid job can have (the spec's own bounds, which
tests/test_messages.py ties to these constants). Whether a value fits *this* job (an index past
promptsPerStep, a version from the future) is for the reader, who knows the job.
"""

from __future__ import annotations

import math
import time
from typing import Annotated, Any, ClassVar, Optional, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SCHEMA_VERSION = 1
# The largest values a valid job can produce (spec bounds: learner.totalSteps, learner.promptsPerStep,
# algorithm.samplesPerPrompt, generator.sampling.maxTokens); the bus carries nothing larger.
MAX_STEPS = 10_000_000
MAX_PROMPTS_PER_STEP = 65536
MAX_SAMPLES = 256
MAX_TOKENS = 32768
MAX_PROMPT_TOKENS = 1 << 20
MAX_TEXT = 1 << 20  # characters of any string (the bus's messages are at most a few MiB)
MAX_ID = 512
TokenId = Annotated[int, Field(ge=0, lt=1 << 31)]
Step = Annotated[int, Field(ge=0, le=MAX_STEPS)]


class MessageError(ValueError):
    """A message that cannot be decoded: wrong schema, version or JSON."""


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, str_max_length=MAX_TEXT)
    v: int = SCHEMA_VERSION
    kind: ClassVar[str] = "message"

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def decode(cls: type[M], data: bytes) -> M:
        try:
            msg = cls.model_validate_json(data)
        except ValidationError as err:
            raise MessageError(f"invalid {cls.kind} message: {err}") from err
        if msg.v != SCHEMA_VERSION:
            raise MessageError(f"{cls.kind} message has schema version {msg.v}, expected {SCHEMA_VERSION}")
        return msg


M = TypeVar("M", bound=Message)


class Prompt(Message):
    """One prompt to complete K times. Published by the learner `max_staleness` batches ahead."""

    kind: ClassVar[str] = "prompt"
    id: str = Field(max_length=MAX_ID, description="Unique id; also the JetStream de-duplication id.")
    batch: Step = Field(description="Learner step whose batch this prompt belongs to.")
    index: int = Field(ge=0, lt=MAX_PROMPTS_PER_STEP, description="Position in the batch.")
    text: str
    answer: str = ""
    samples: int = Field(ge=1, le=MAX_SAMPLES, description="Completions to generate (K).")
    min_version: Step = Field(description="Generate with policy version >= this (staleness bound).")
    attempt: int = Field(0, ge=0, description="0, or how many times this prompt was released again.")
    messages: Optional[list[dict[str, Any]]] = Field(
        None, description="The prompt as chat messages, when its record holds them (`text` is their plain form).")
    columns: dict[str, Any] = Field(default_factory=dict, description="The record's other columns, for rewards.")

    @field_validator("messages", "columns")
    @classmethod
    def _missing_not_infinite(cls, value: Any) -> Any:
        """Free-form record values: NaN/Infinity (a dataset's missing value, or a peer's) become None,
        as JSON has no such numbers; what decodes then encodes back to itself."""
        return _finite(value)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


class Completion(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, str_max_length=MAX_TEXT)
    text: str
    token_ids: list[TokenId] = Field(max_length=MAX_TOKENS)
    logprobs: list[float] = Field(max_length=MAX_TOKENS, description="Per-token log-probs under the generating policy.")
    eos: bool = Field(description="Ended with EOS (not cut at maxTokens).")
    score: float = Field(description="Task reward, before any no-EOS penalty.")

    @model_validator(mode="after")
    def _one_logprob_per_token(self) -> "Completion":
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"{len(self.token_ids)} token ids but {len(self.logprobs)} log-probs: one per token")
        return self


class RolloutGroup(Message):
    """The K completions of one prompt, generated by one policy version."""

    kind: ClassVar[str] = "rollout"
    id: str = Field(max_length=MAX_ID)
    prompt_id: str = Field(max_length=MAX_ID)
    batch: Step
    index: int = Field(ge=0, lt=MAX_PROMPTS_PER_STEP)
    prompt_text: str
    prompt_token_ids: list[TokenId] = Field(max_length=MAX_PROMPT_TOKENS)
    completions: list[Completion] = Field(min_length=1, max_length=MAX_SAMPLES)
    policy_version: Step
    generator_id: str = Field(max_length=MAX_ID)
    created: float = Field(default_factory=time.time)
    generation_seconds: float = 0.0

    def encode(self) -> bytes:
        """msgpack, token ids and log-probs packed (the module docstring); `decode` reads it back exactly."""
        import msgpack  # here, not at the top: the operator imports this module and never moves rollouts

        data = self.model_dump(exclude={"completions", "prompt_token_ids"})
        data["prompt_token_ids"] = _pack(self.prompt_token_ids, _IDS)
        data["completions"] = [{"text": c.text, "token_ids": _pack(c.token_ids, _IDS),
                                "logprobs": _pack(c.logprobs, _LOGPROBS), "eos": c.eos, "score": c.score}
                               for c in self.completions]
        return msgpack.packb(data, use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> "RolloutGroup":
        if data[:1] == b"{":  # the JSON form
            return super().decode(data)
        import msgpack

        try:
            raw = msgpack.unpackb(data, raw=False)
            if not isinstance(raw, dict) or not isinstance(raw.get("completions"), list):
                raise ValueError("not a map with a list of completions")
            prompt_ids = _unpack(raw.get("prompt_token_ids"), _IDS, "prompt_token_ids", MAX_PROMPT_TOKENS)
            # the packed arrays are checked whole (below and in _unpack); everything else by the schema
            completions = [_completion(c) for c in raw["completions"]]
            msg = cls.model_validate({**raw, "prompt_token_ids": [], "completions": completions})
        except (ValueError, TypeError, msgpack.UnpackException) as err:  # ValidationError is a ValueError
            raise MessageError(f"invalid {cls.kind} message: {err}") from err
        if msg.v != SCHEMA_VERSION:
            raise MessageError(f"{cls.kind} message has schema version {msg.v}, expected {SCHEMA_VERSION}")
        return msg.model_copy(update={"prompt_token_ids": prompt_ids.tolist()})


_IDS, _LOGPROBS = "<u4", "<f8"  # token ids are TokenIds (< 2**31), log-probs exact


def _pack(values: list, dtype: str) -> bytes:
    import numpy as np

    return np.asarray(values, dtype=dtype).tobytes()


def _unpack(packed: Any, dtype: str, name: str, limit: int) -> Any:
    """A packed array (numpy), refused as the schema would refuse its list: too long, a token id not
    a TokenId (< 2**31), a log-prob not finite."""
    import numpy as np

    dtype = np.dtype(dtype)
    if not isinstance(packed, bytes) or len(packed) % dtype.itemsize:
        raise ValueError(f"{name}: expected packed {dtype.itemsize}-byte values")
    values = np.frombuffer(packed, dtype=dtype)
    if len(values) > limit:
        raise ValueError(f"{name}: {len(values)} values, at most {limit}")
    if dtype == _IDS and len(values) and values.max() >= 1 << 31:
        raise ValueError(f"{name}: a token id >= 2**31")
    if dtype == _LOGPROBS and not np.isfinite(values).all():
        raise ValueError(f"{name}: a log-prob that is not finite")
    return values


def _completion(c: Any) -> "Completion":
    if not isinstance(c, dict):
        raise ValueError("a completion is not a map")
    ids = _unpack(c.get("token_ids"), _IDS, "token_ids", MAX_TOKENS)
    logprobs = _unpack(c.get("logprobs"), _LOGPROBS, "logprobs", MAX_TOKENS)
    if len(ids) != len(logprobs):
        raise ValueError(f"{len(ids)} token ids but {len(logprobs)} log-probs: one per token")
    shell = Completion.model_validate({**c, "token_ids": [], "logprobs": []})  # text, eos, score, no other key
    return shell.model_copy(update={"token_ids": ids.tolist(), "logprobs": logprobs.tolist()})


class WeightsAnnouncement(Message):
    """A complete snapshot is on the shared volume; generators verify and reload."""

    kind: ClassVar[str] = "weights"
    version: Step
    path: str = Field(max_length=4096)
    checksum: str = Field(max_length=128, description="sha256 over the snapshot manifest (see snapshots.py).")
    created: float = Field(default_factory=time.time)


class Preference(Message):
    """A labelled pair for the one-pass reward head: `chosen` preferred over `rejected`."""

    kind: ClassVar[str] = "preference"
    id: str
    prompt: str
    chosen: str
    rejected: str
    source: str = "human"


class RewardHead(Message):
    """The one-pass reward head's parameters θ (KV key `reward-head`): the learner process learns
    them from preferences, generators score with θᵀφ(prompt, answer)."""

    kind: ClassVar[str] = "reward-head"
    theta: list[float] = Field(max_length=1 << 20)
    updates: int = Field(0, ge=0, description="Preferences learned from so far.")


GENERATOR_HEARTBEAT_SECONDS = 15.0  # a generator reports at least this often, busy or idle
LEARNER_HEARTBEAT_SECONDS = 15.0  # the learner writes its progress at least this often, even mid-step
GENERATOR_STALE_SECONDS = 120.0  # a report older than this is from a generator that is gone
GENERATOR_FORGET_SECONDS = 900.0  # ... and after this long its report is folded into RETIRED_GENERATORS
RETIRED_GENERATORS = "_retired"  # the report summing up generators that are gone (never fresh)


class GeneratorStatus(Message):
    """What a generator reports (KV key `generator.<id>`). Reports of generators that are gone
    stay (their rollout counts still add up) but are not fresh: the learner no longer spares
    their snapshot from pruning and the operator leaves them out of `generatorVersions`."""

    kind: ClassVar[str] = "generator-status"
    generator_id: str
    policy_version: int
    rollouts: int = 0
    tokens: int = 0
    tokens_per_second: float = 0.0
    refused_version: Optional[int] = Field(None, description="The newest snapshot this generator refused, if any.")
    refused_checksum: str = ""
    refused_reason: str = ""
    # cumulative in this process (autoscale.py differentiates two reads; a counter that went down = a restart)
    busy_seconds: float = Field(0.0, ge=0, description="Seconds the engine generated (calls finished).")
    prompt_wait_seconds: float = Field(0.0, ge=0, description="Seconds idle because no prompt was there.")
    weights_wait_seconds: float = Field(0.0, ge=0, description="Seconds idle waiting for new enough weights.")
    uptime_seconds: float = Field(0.0, ge=0, description="Seconds since the generator process started.")
    updated: float = Field(default_factory=time.time)

    def fresh(self, now: float) -> bool:
        return now - self.updated <= GENERATOR_STALE_SECONDS


class LearnerProgress(Message):
    """What the learner reports (KV key `learner`); the operator copies it into `.status`."""

    kind: ClassVar[str] = "learner-progress"
    step: int
    total_steps: int
    policy_version: int
    rollouts_consumed: int = 0
    rollouts_dropped: int = 0
    rollouts_dead: int = Field(0, description="Messages set aside in the job's dead letters.")
    duplicates_skipped: int = 0
    staleness_mean: float = 0.0
    staleness_max: int = 0
    reward_mean: Optional[float] = None
    samples_per_second: float = 0.0
    last_snapshot: str = ""
    done: bool = False
    failed: str = ""
    # cumulative in this process (autoscale.py differentiates two reads; a counter that went down = a restart)
    rollout_wait_seconds: float = Field(0.0, ge=0,
                                        description="Seconds waited for rollouts, the current wait included.")
    uptime_seconds: float = Field(0.0, ge=0, description="Seconds since the learner process started.")
    prompts_pending: Optional[int] = Field(None, ge=0, description="Released prompts no generator has taken yet "
                                           "(the last poll of the bus; None: not polled).")
    updated: float = Field(default_factory=time.time)
