"""spec.nats.maxMessageBytes end to end: `asyncrlhf run`'s nats-server takes messages that large, a
generator refuses a bus that takes smaller ones (exit 2, not restarted), and a rollout group that
grew past the bus's limit stops its generator with the reason instead of failing for ever."""

from __future__ import annotations

import asyncio

import pytest

from asyncrlhf.api import AsyncRLHFJob, JobSpec
from asyncrlhf.bus import BusLimitError, EmbeddedNats, JobBus, check_message_size, connect, ensure_job_resources
from asyncrlhf.generator import HEADERS_ALLOWANCE, Generator, encode_for_bus
from asyncrlhf.local import LocalRun
from asyncrlhf.messages import Completion, RolloutGroup


def _group(tokens: int, text_per_token: str = "word") -> RolloutGroup:
    completion = Completion(text=text_per_token * tokens, token_ids=[7] * tokens, logprobs=[-0.5] * tokens,
                            eos=True, score=1.0)
    return RolloutGroup(id="r-1", prompt_id="p-1", batch=0, index=0, prompt_text="q", prompt_token_ids=[1],
                        completions=[completion] * 4, policy_version=0, generator_id="g")


def test_a_group_larger_than_the_bus_takes_goes_without_its_texts_or_stops_the_generator():
    fits = _group(1000)  # 4 x 1000 x (4 + 4 + 8) bytes = 64,000 + the envelope
    size = len(fits.encode())
    assert 64_000 < size < 64_500
    assert [RolloutGroup.decode(d) for d in encode_for_bus([fits], size + HEADERS_ALLOWANCE)] == [fits]
    # a byte short: the texts (16,000 bytes; the learner trains on token ids) are left out
    [bare] = [RolloutGroup.decode(d) for d in encode_for_bus([fits], size + HEADERS_ALLOWANCE - 1)]
    assert [c.text for c in bare.completions] == [""] * 4
    assert [(c.token_ids, c.logprobs, c.score) for c in bare.completions] == \
        [(c.token_ids, c.logprobs, c.score) for c in fits.completions]
    with pytest.raises(BusLimitError, match=r"rollout group r-1 \(1 prompt tokens, 4000 generated\) is \d+ bytes even "
                                            r"without its texts, more than the bus's largest message \(48000 bytes\)"
                                            r".*nats.maxMessageBytes"):
        encode_for_bus([fits], 48_000)  # 4 x 1000 x 12 = 48,000 bytes of ids and log-probs alone


def test_check_message_size_against_a_real_server():
    with EmbeddedNats() as small, EmbeddedNats(config=f"max_payload: {8 << 20}\n") as large, \
            EmbeddedNats(config="max_payload: 65536\n") as tiny:
        async def go() -> None:
            nc = await connect(tiny.url)
            try:  # no job fits a bus below 1 MiB: the error says to raise the server's limit
                with pytest.raises(BusLimitError, match="jobs need at least 1 MiB .*: raise max_payload"):
                    check_message_size(nc, 1 << 20)
            finally:
                await nc.close()
            for server, size in ((small, 1 << 20), (large, 8 << 20)):
                nc = await connect(server.url)
                try:
                    assert nc.max_payload == size
                    check_message_size(nc, size)
                    if size == 1 << 20:
                        with pytest.raises(BusLimitError, match=r"at most 1048576 bytes .* spec.nats.maxMessageBytes "
                                                                r"is 8388608: set nats.maxMessageBytes to at most 1048576"):
                            check_message_size(nc, 8 << 20)
                finally:
                    await nc.close()

        asyncio.run(go())


@pytest.mark.slow
def test_a_generator_refuses_a_bus_that_takes_smaller_messages_than_the_spec_says():
    spec = JobSpec.model_validate({"generator": {"engine": "hf"}, "nats": {"maxMessageBytes": 8 << 20}})
    bus = JobBus("default", "size")
    with EmbeddedNats() as server:  # nats-server's default: 1 MiB
        async def go() -> None:
            nc = await connect(server.url)
            await ensure_job_resources(nc.jetstream(), bus, 1 << 24, 30)
            await nc.close()
            with pytest.raises(BusLimitError, match="set nats.maxMessageBytes to at most 1048576"):
                await Generator(spec, bus, server.url, "g0").run()

        asyncio.run(go())


@pytest.mark.slow
def test_asyncrlhf_runs_nats_server_takes_the_jobs_message_size(tmp_path):
    job = AsyncRLHFJob.model_validate({"metadata": {"name": "big"}, "spec": {
        "model": {"policy": "builtin:tiny-sort"}, "nats": {"maxMessageBytes": 16 << 20}}})
    run = LocalRun(job, tmp_path / "big", quiet=True)
    run.prepare()  # starts the nats-server (or raises: nothing to close then)
    try:
        async def size() -> int:
            nc = await connect(run.url)
            try:
                return nc.max_payload
            finally:
                await nc.close()

        assert asyncio.run(size()) == 16 << 20
    finally:
        run.nats.close()
