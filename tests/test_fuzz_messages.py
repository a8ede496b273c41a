"""Fuzzing the bus's decoders: for every message type, any bytes either decode or raise
MessageError — never another exception — and what decodes holds only safe values.

1,200 inputs in all: raw bytes, JSON objects with the message's own field names and arbitrary
values (so validation, not only parsing, is exercised), and valid messages with one field replaced
by a hostile value; 600 more for the rollout group's msgpack form (packed arrays included). Plus a
table of the dangerous values the audit found, each refused.
"""

from __future__ import annotations

import json
import math

import msgpack
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from asyncrlhf import messages
from asyncrlhf.messages import Completion, Message, MessageError, Prompt, RolloutGroup

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _all_types(cls=Message) -> list[type[Message]]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub] + _all_types(sub)
    return found


TYPES = sorted({t for t in _all_types() if t.__module__ == messages.__name__}, key=lambda t: t.__name__)
NASTY = st.sampled_from([math.nan, math.inf, -math.inf, 10 ** 30, -1, 2 ** 63, 1e308, "", "x" * 5000, [], {},
                         [[[]]], None, True, "NaN"])
JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | NASTY
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=5), max_leaves=20)


def _dumps(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()  # NaN and Infinity on the wire, as a bad peer could


def decode(cls: type[Message], data: bytes) -> None:
    try:
        msg = cls.decode(data)
    except MessageError:
        event(f"{cls.__name__}: refused")
        return
    event(f"{cls.__name__}: decoded")
    assert isinstance(msg, cls)
    assert cls.decode(msg.encode()) == msg  # what decodes encodes back to itself


def sample(cls: type[Message]) -> dict:
    """A valid message of each type, as JSON data."""
    completion = {"text": "1 2", "token_ids": [5, 6], "logprobs": [-0.1, -0.2], "eos": True, "score": 1.0}
    examples = {
        "Prompt": {"id": "p0-0", "batch": 0, "index": 0, "text": "2 1 =", "samples": 4, "min_version": 0},
        "RolloutGroup": {"id": "r", "prompt_id": "p", "batch": 1, "index": 2, "prompt_text": "x",
                         "prompt_token_ids": [1, 2], "completions": [completion, completion], "policy_version": 1,
                         "generator_id": "g"},
        "WeightsAnnouncement": {"version": 1, "path": "/s/v1", "checksum": "ab"},
        "Preference": {"id": "q", "prompt": "p", "chosen": "a", "rejected": "b"},
        "RewardHead": {"theta": [0.5, -0.5], "updates": 2},
        "GeneratorStatus": {"generator_id": "g", "policy_version": 1},
        "LearnerProgress": {"step": 1, "total_steps": 2, "policy_version": 1},
    }
    return json.loads(cls(**examples[cls.__name__]).model_dump_json()) if cls.__name__ in examples else {}


@settings(FUZZ, max_examples=400)
@given(st.sampled_from(TYPES), st.binary(max_size=400))
def test_arbitrary_bytes(cls, data):
    decode(cls, data)


@settings(FUZZ, max_examples=400)
@given(st.sampled_from(TYPES), st.data())
def test_objects_with_the_messages_own_fields(cls, data):
    names = sorted(cls.model_fields)
    obj = data.draw(st.dictionaries(st.sampled_from(names) | st.text(max_size=5), JSON_VALUES, max_size=len(names)))
    decode(cls, _dumps(obj))


@settings(FUZZ, max_examples=400)
@given(st.sampled_from(TYPES), st.data())
def test_valid_messages_with_one_hostile_value(cls, data):
    obj = sample(cls)
    if not obj:
        return  # a type added since: covered by the two tests above
    key = data.draw(st.sampled_from(sorted(obj)))
    obj[key] = data.draw(JSON_VALUES)
    if key == "completions" and isinstance(obj[key], list) and data.draw(st.booleans()):
        obj[key] = [{**sample(RolloutGroup)["completions"][0], data.draw(st.sampled_from(
            ["token_ids", "logprobs", "score", "text", "eos"])): data.draw(JSON_VALUES)}]
    decode(cls, _dumps(obj))


MSGPACK_SCALARS = (st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 64 - 1) | st.floats() | st.text(max_size=20)
                   | st.binary(max_size=40) | st.sampled_from([b"\x00" * 12, b"\xff" * 8, b"\x00\x00\xf8\x7f" * 2]))
MSGPACK_VALUES = st.recursive(MSGPACK_SCALARS, lambda inner: st.lists(inner, max_size=5)
                              | st.dictionaries(st.text(max_size=10), inner, max_size=5), max_leaves=20)


def _packed_sample() -> dict:
    return msgpack.unpackb(RolloutGroup.model_validate(sample(RolloutGroup)).encode())


@settings(FUZZ, max_examples=300)
@given(st.data())
def test_packed_rollout_groups_with_the_schemas_own_fields(data):
    names = sorted(RolloutGroup.model_fields)
    obj = data.draw(st.dictionaries(st.sampled_from(names) | st.text(max_size=5), MSGPACK_VALUES, max_size=len(names)))
    decode(RolloutGroup, msgpack.packb(obj))


@settings(FUZZ, max_examples=300)
@given(st.data())
def test_packed_rollout_groups_with_one_hostile_value(data):
    """Packed arrays of any length and content (NaN log-probs, token ids past 2**31, cut arrays) among them."""
    obj = _packed_sample()
    key = data.draw(st.sampled_from(sorted(obj)))
    obj[key] = data.draw(MSGPACK_VALUES)
    if key == "completions" and isinstance(obj[key], list) and data.draw(st.booleans()):
        obj[key] = [{**_packed_sample()["completions"][0], data.draw(st.sampled_from(
            ["token_ids", "logprobs", "score", "text", "eos"])): data.draw(MSGPACK_VALUES)}]
    decode(RolloutGroup, msgpack.packb(obj))


def test_every_message_type_has_a_sample():
    assert len(TYPES) >= 7
    assert [t.__name__ for t in TYPES if not sample(t)] == [], \
        "add the new message type to sample() so the hostile-value fuzz covers it"


def _group(**change) -> bytes:
    obj = sample(RolloutGroup)
    obj.update(change)
    return _dumps(obj)


def _completion(**change) -> dict:
    return {**sample(RolloutGroup)["completions"][0], **change}


# The values the audit found dangerous, each refused at decode (what the learner then dead-letters).
DANGEROUS = [
    ("NaN score", RolloutGroup, _group(completions=[_completion(score=math.nan)])),
    ("infinite score", RolloutGroup, _group(completions=[_completion(score=math.inf)])),
    ("NaN log-prob", RolloutGroup, _group(completions=[_completion(logprobs=[-0.1, math.nan])])),
    ("fewer log-probs than tokens", RolloutGroup, _group(completions=[_completion(logprobs=[-0.1])])),
    ("no completions", RolloutGroup, _group(completions=[])),
    ("negative token id", RolloutGroup, _group(completions=[_completion(token_ids=[5, -1])])),
    ("negative prompt token id", RolloutGroup, _group(prompt_token_ids=[-3])),
    ("batch 10^8", RolloutGroup, _group(batch=10 ** 8)),
    ("index past any job's promptsPerStep", RolloutGroup, _group(index=65536)),
    ("policy version 10^9", RolloutGroup, _group(policy_version=10 ** 9)),
    ("257 completions", RolloutGroup, _group(completions=[_completion()] * 257)),
    ("K = 10^6", Prompt, _dumps({**sample(Prompt), "samples": 10 ** 6})),
    ("NaN in the reward head", messages.RewardHead, _dumps({"theta": [0.1, math.nan]})),
    ("infinite reward mean", messages.LearnerProgress, _dumps({**sample(messages.LearnerProgress),
                                                               "reward_mean": math.inf})),
]


@pytest.mark.parametrize("case,cls,data", DANGEROUS, ids=[d[0] for d in DANGEROUS])
def test_dangerous_values_are_refused(case, cls, data):
    with pytest.raises(MessageError, match=f"invalid {cls.kind} message"):
        cls.decode(data)


def test_a_completion_with_one_log_prob_per_token_is_fine_and_the_error_says_why_not():
    assert Completion(text="", token_ids=[], logprobs=[], eos=False, score=0.0).token_ids == []
    with pytest.raises(MessageError, match="2 token ids but 1 log-probs"):
        RolloutGroup.decode(_group(completions=[_completion(logprobs=[-0.1])]))


def test_a_prompts_free_form_values_hold_no_infinities():
    """A record column that is NaN (a dataset's missing value) or a peer's Infinity becomes None:
    JSON has no such numbers, and the message must encode back to what it decoded from."""
    columns = {"a": math.inf, "b": [1.0, math.nan], "c": {"d": -math.inf}}
    wire = json.dumps({**sample(messages.Prompt), "columns": columns,
                       "messages": [{"role": "user", "content": "x", "w": math.nan}]}, allow_nan=True).encode()
    msg = messages.Prompt.decode(wire)
    assert msg.columns == {"a": None, "b": [1.0, None], "c": {"d": None}} and msg.messages[0]["w"] is None
    assert messages.Prompt.decode(msg.encode()) == msg
