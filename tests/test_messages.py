"""Bus messages: typed, versioned, JSON (rollout groups: msgpack with packed arrays, JSON still
read); anything else is refused with a clear error."""

from __future__ import annotations

import json
import struct

import msgpack
import pytest

from asyncrlhf.bus import JobBus
from asyncrlhf.messages import (
    MAX_PROMPT_TOKENS, MAX_TOKENS, Completion, LearnerProgress, MessageError, Prompt, RolloutGroup, WeightsAnnouncement,
)


def group() -> RolloutGroup:
    return RolloutGroup(
        id="r-1", prompt_id="p-1", batch=3, index=1, prompt_text="3 1 =", prompt_token_ids=[1, 7, 5, 14],
        completions=[Completion(text="1 3", token_ids=[5, 7, 2], logprobs=[-0.1, -0.2, -0.3], eos=True, score=1.0)],
        policy_version=2, generator_id="g0",
    )


@pytest.mark.parametrize("msg", [
    Prompt(id="p", batch=0, index=0, text="1 2 =", samples=4, min_version=0),
    WeightsAnnouncement(version=3, path="/s/v3", checksum="ab"),
    LearnerProgress(step=1, total_steps=2, policy_version=1, reward_mean=0.5),
])
def test_round_trip(msg):
    data = msg.encode()
    assert json.loads(data)["v"] == 1  # JSON on the wire, with its schema version
    assert type(msg).decode(data) == msg


def test_a_rollout_group_travels_as_msgpack_with_packed_arrays_and_comes_back_exactly():
    g = group()
    wire = msgpack.unpackb(g.encode())
    assert wire["v"] == 1 and wire["prompt_token_ids"] == struct.pack("<4I", 1, 7, 5, 14)
    c = wire["completions"][0]
    assert c == {"text": "1 3", "token_ids": struct.pack("<3I", 5, 7, 2), "logprobs": struct.pack("<3d", -0.1, -0.2, -0.3),
                 "eos": True, "score": 1.0}
    assert RolloutGroup.decode(g.encode()) == g  # float64 log-probs: exact
    assert RolloutGroup.decode(g.model_dump_json().encode()) == g  # the JSON form (an earlier release) is read too
    # text + 4 + 8 bytes a token (16 here) instead of JSON's digits (4 + 7 + 20): 1,000 tokens of 4-byte words
    big = g.model_copy(update={"completions": [Completion(text="word" * 1000, token_ids=[128000 + i for i in range(1000)],
                                                          logprobs=[-1.2345678901234567] * 1000, eos=True, score=0.5)]})
    assert 16 * 1000 < len(big.encode()) < 16 * 1000 + 300 and len(big.model_dump_json()) > 31 * 1000


def _packed(**change) -> bytes:
    wire = msgpack.unpackb(group().encode())
    wire.update(change)
    return msgpack.packb(wire)


def _packed_completion(**change) -> dict:
    return {**msgpack.unpackb(group().encode())["completions"][0], **change}


@pytest.mark.parametrize("case,data,error", [
    ("a NaN log-prob", _packed(completions=[_packed_completion(logprobs=struct.pack("<3d", -0.1, float("nan"), 0))]),
     "log-prob that is not finite"),
    ("an infinite score", _packed(completions=[_packed_completion(score=float("inf"))]), "finite"),
    ("a token id past any vocabulary", _packed(completions=[_packed_completion(token_ids=struct.pack("<3I", 5, 1 << 31, 2))]),
     "token id >= 2"),
    ("fewer log-probs than tokens", _packed(completions=[_packed_completion(logprobs=struct.pack("<2d", -0.1, -0.2))]),
     "3 token ids but 2 log-probs"),
    ("token ids as a list", _packed(completions=[_packed_completion(token_ids=[5, 7, 2])]), "expected packed 4-byte"),
    ("a cut array", _packed(completions=[_packed_completion(token_ids=struct.pack("<3I", 5, 7, 2)[:-1])]),
     "expected packed 4-byte"),
    ("more tokens than maxTokens allows", _packed(completions=[_packed_completion(
        token_ids=bytes(4 * (MAX_TOKENS + 1)), logprobs=bytes(8 * (MAX_TOKENS + 1)))]), f"at most {MAX_TOKENS}"),
    ("a longer prompt than any", _packed(prompt_token_ids=bytes(4 * (MAX_PROMPT_TOKENS + 1))), f"at most {MAX_PROMPT_TOKENS}"),
    ("no completions", _packed(completions=[]), "at least 1"),
    ("a completion that is not a map", _packed(completions=[b"x"]), "not a map"),
    ("a key no schema has", _packed(completions=[_packed_completion(extra=1)]), "xtra"),
    ("a negative batch", _packed(batch=-1), "batch"),
    ("a list, not a map", msgpack.packb([1, 2]), "not a map"),
    ("cut short", group().encode()[:-5], "invalid rollout message"),
    ("a version from the future", _packed(v=2), "schema version 2"),
])
def test_a_packed_rollout_group_is_refused_as_the_json_one_would_be(case, data, error):
    with pytest.raises(MessageError, match=error):
        RolloutGroup.decode(data)


def test_unknown_version_is_refused():
    data = json.loads(group().model_dump_json())
    data["v"] = 2
    with pytest.raises(MessageError, match="schema version 2"):
        RolloutGroup.decode(json.dumps(data).encode())


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("policy_version"),
    lambda d: d.update(extra=1),
    lambda d: d.update(batch=-1),
])
def test_malformed_is_refused(mutate):
    data = json.loads(group().model_dump_json())
    mutate(data)
    with pytest.raises(MessageError, match="invalid rollout message"):
        RolloutGroup.decode(json.dumps(data).encode())


def test_not_json_is_refused():
    with pytest.raises(MessageError):
        Prompt.decode(b"\x80\x04pickle")


def test_names_of_a_job():
    bus = JobBus("team-a", "tiny-sort")
    assert bus.subject("rollouts") == "asyncrlhf.team-a.tiny-sort.rollouts"
    assert bus.stream == "ARJ_team-a_tiny-sort"
    assert bus.bucket == "arj_team-a_tiny-sort"
    config = bus.stream_config(1 << 20)
    assert config.retention.value == "workqueue" and config.discard.value == "new"
    assert sorted(c.durable_name for c in bus.consumer_configs(30)) == ["generators", "learner", "reward"]


def test_a_generator_report_is_fresh_for_two_minutes_and_busy_generators_keep_reporting(monkeypatch):
    import asyncio
    import types

    from asyncrlhf import generator as generator_module
    from asyncrlhf.messages import GENERATOR_HEARTBEAT_SECONDS, GENERATOR_STALE_SECONDS, GeneratorStatus

    report = GeneratorStatus(generator_id="g", policy_version=3, updated=1000.0)
    assert report.fresh(1000.0 + GENERATOR_STALE_SECONDS) and not report.fresh(1000.1 + GENERATOR_STALE_SECONDS)
    assert GENERATOR_HEARTBEAT_SECONDS * 4 <= GENERATOR_STALE_SECONDS  # missing a few beats is not death

    # the heartbeat reports on its own, whatever the generator is doing (a long generation runs
    # in a thread and blocks nothing here)
    monkeypatch.setattr(generator_module, "GENERATOR_HEARTBEAT_SECONDS", 0.02)
    reports = []

    async def report(kv) -> None:
        reports.append(kv)

    async def beat_for(seconds: float) -> None:
        task = asyncio.create_task(generator_module.Generator._heartbeat(types.SimpleNamespace(report=report), "kv"))
        await asyncio.sleep(seconds)
        task.cancel()

    asyncio.run(beat_for(0.3))
    assert len(reports) >= 5 and set(reports) == {"kv"}


@pytest.mark.parametrize("message_bytes", [1 << 20, 8 << 20])
def test_a_group_at_the_specs_limit_fits_in_the_buss_message_size(message_bytes):
    """spec/rules.py lets K x maxTokens reach max_group_tokens(nats.maxMessageBytes) at BYTES_PER_TOKEN:
    a group that long, every token's text 12 bytes (3x an average English token), after a
    6,000-token prompt, fits (NATS's default 1 MiB; the chart's NATS, 8 MiB)."""
    from asyncrlhf.spec.rules import BYTES_PER_TOKEN, GROUP_ENVELOPE_BYTES, max_group_tokens

    k, text = 16, "x" * (BYTES_PER_TOKEN - 12)
    n = max_group_tokens(message_bytes) // k
    completion = Completion(text=text * n, token_ids=[150000] * n, logprobs=[-1.0] * n, eos=False, score=0.0)
    g = group().model_copy(update={"prompt_text": "word" * 6000, "prompt_token_ids": [1] * 6000,
                                   "completions": [completion] * k})
    assert message_bytes - GROUP_ENVELOPE_BYTES < len(g.encode()) <= message_bytes
    from asyncrlhf.generator import encode_for_bus

    assert encode_for_bus([g], message_bytes) == [g.encode()]  # with its texts, and room for the headers
