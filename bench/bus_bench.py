"""The bus's rollout path against raw nats-py, side by side in one run.

    python bench/bus_bench.py [--messages 4000] [--rounds 3] [--quick]

One embedded nats-server, one stream per variant (the job's stream configuration: file storage,
work queue, de-duplication window). Each variant publishes the same rollout groups (a K=4 group of
~9 KB, the size the local example's groups reach with longer answers), pulls them back in batches,
decodes and acks them; the clock covers publish + fetch + decode + ack (the payloads are encoded
before it starts; encoding and decoding alone are timed apart, and so are the rollout group's two
wire forms, JSON and msgpack with packed arrays, on this group and on a real model's). Variants:
  * raw nats-py, publishes in flight: `js.publish_async` (nats-py's own pipelining, up to 4000
    outstanding PubAcks), `fetch(256)`, `ack()` — no de-duplication id, no retry, no decoding;
  * raw nats-py, one at a time: `await js.publish` for each message;
  * asyncrlhf: `bus.publish_all` (the generator's path: de-duplication ids, retries with
    back-pressure, `PUBLISHES_IN_FLIGHT` outstanding), `RolloutGroup.decode` (validated), `ack()`;
  * asyncrlhf, one at a time: `bus.publish` awaited per message (the generator's path before).
Rounds alternate the order; the best round of each counts (least disturbed by other load).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workloads"))

from asyncrlhf.bus import (  # noqa: E402
    LEARNER_CONSUMER, ROLLOUTS, EmbeddedNats, JobBus, connect, delete_job_resources, ensure_job_resources,
    publish, publish_all,
)
from asyncrlhf.messages import Completion, RolloutGroup  # noqa: E402

FETCH = 256


def make_groups(n: int, tokens: int = 128) -> list[RolloutGroup]:
    completions = [Completion(text="x" * 2 * tokens, token_ids=[(7 * j + i) % 512 for i in range(tokens)],
                              logprobs=[-0.123456789 * (i % 9) for i in range(tokens)], eos=True, score=0.5)
                   for j in range(4)]
    return [RolloutGroup(id=f"r-{i}", prompt_id=f"p-{i}", batch=i // 32, index=i % 32, prompt_text="sort: 3 1 2",
                         prompt_token_ids=list(range(24)), completions=completions, policy_version=0,
                         generator_id="g0") for i in range(n)]


async def drain(js, bus: JobBus, n: int, decode: bool) -> None:
    sub = await js.pull_subscribe_bind(LEARNER_CONSUMER, bus.stream)
    got = 0
    while got < n:
        for msg in await sub.fetch(min(FETCH, n - got), timeout=10):
            if decode:
                RolloutGroup.decode(msg.data)
            await msg.ack()
            got += 1
    await sub.unsubscribe()


async def raw_in_flight(js, subject: str, payloads: list[bytes], ids: list[str]) -> None:
    futures = [await js.publish_async(subject, p) for p in payloads]
    await asyncio.gather(*futures)


async def raw_one_at_a_time(js, subject: str, payloads: list[bytes], ids: list[str]) -> None:
    for p in payloads:
        await js.publish(subject, p)


async def ours_in_flight(js, subject: str, payloads: list[bytes], ids: list[str]) -> None:
    await publish_all(js, [(subject, p, i) for p, i in zip(payloads, ids)])


async def ours_one_at_a_time(js, subject: str, payloads: list[bytes], ids: list[str]) -> None:
    for p, i in zip(payloads, ids):
        await publish(js, subject, p, i)


VARIANTS = {  # name: (publisher, encode and decode with the message schema)
    "raw nats-py, in flight": (raw_in_flight, False),
    "raw nats-py, one at a time": (raw_one_at_a_time, False),
    "asyncrlhf, in flight": (ours_in_flight, True),
    "asyncrlhf, one at a time": (ours_one_at_a_time, True),
}


async def run_variant(url: str, name: str, groups: list[RolloutGroup], raw: list[bytes], tag: str) -> float:
    """Messages per second through publish + fetch + decode + ack, on a fresh stream."""
    publisher, schema = VARIANTS[name]
    nc = await connect(url)
    js = nc.jetstream()
    bus = JobBus("bench", f"bus-{tag}")
    await ensure_job_resources(js, bus, 1 << 30, 60.0)
    payloads = [g.encode() for g in groups] if schema else raw  # encoded before the clock, as for raw
    started = time.perf_counter()
    await publisher(js, bus.subject(ROLLOUTS), payloads, [g.id for g in groups])
    await drain(js, bus, len(groups), decode=schema)
    await nc.flush()
    elapsed = time.perf_counter() - started
    await delete_job_resources(js, bus)
    await nc.close()
    return len(groups) / elapsed


async def bench(url: str, n: int, rounds: int) -> dict[str, float]:
    groups = make_groups(n)
    raw = [g.encode() for g in groups]
    best: dict[str, float] = {}
    for r in range(rounds):
        names = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
        for k, name in enumerate(names):
            rate = await run_variant(url, name, groups, raw, f"{r}-{k}")
            best[name] = max(best.get(name, 0.0), rate)
    return best


def codec_microseconds(groups: list[RolloutGroup]) -> tuple[float, float]:
    """(encode, validated decode) per message, in microseconds."""
    started = time.perf_counter()
    raw = [g.encode() for g in groups]
    encoded = time.perf_counter()
    for r in raw:
        RolloutGroup.decode(r)
    done = time.perf_counter()
    return (encoded - started) * 1e6 / len(groups), (done - encoded) * 1e6 / len(groups)


def real_group(k: int = 16, tokens: int = 1024) -> RolloutGroup:
    """A group as a real model sends it: token ids of a 128k vocabulary, float32 log-probs (17
    digits in JSON), ~4 bytes of text a token."""
    rng = np.random.default_rng(0)
    completions = [Completion(text="word" * tokens, token_ids=rng.integers(0, 128256, tokens).tolist(),
                              logprobs=np.log(rng.uniform(0.01, 1.0, tokens)).astype(np.float32).astype(float).tolist(),
                              eos=True, score=0.5) for _ in range(k)]
    return RolloutGroup(id="r", prompt_id="p", batch=0, index=0, prompt_text="word" * 256,
                        prompt_token_ids=list(range(256)), completions=completions, policy_version=0, generator_id="g0")


def wire_forms(group: RolloutGroup, repeats: int) -> dict[str, float]:
    """Bytes and validated decode time of the group's two wire forms: JSON (the schema's
    `model_dump_json`, what the bus carried before) and msgpack with packed arrays (`encode`)."""
    out = {}
    for form, data in (("json", group.model_dump_json().encode()), ("packed", group.encode())):
        started = time.perf_counter()
        for _ in range(repeats):
            RolloutGroup.decode(data)
        out[f"{form}_bytes"], out[f"{form}_decode_us"] = len(data), (time.perf_counter() - started) * 1e6 / repeats
    return out


def print_wire_forms(label: str, f: dict[str, float]) -> None:
    print(f"  wire, {label}: JSON {f['json_bytes'] / 1024:.1f} KiB decoded in {f['json_decode_us']:.0f} us, packed "
          f"{f['packed_bytes'] / 1024:.1f} KiB in {f['packed_decode_us']:.0f} us: "
          f"{f['json_bytes'] / f['packed_bytes']:.2f}x smaller, {f['json_decode_us'] / f['packed_decode_us']:.2f}x faster")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="500 messages, 1 round")
    args = parser.parse_args(argv)
    n, rounds = (500, 1) if args.quick else (args.messages, args.rounds)
    size = len(make_groups(1)[0].encode())
    with EmbeddedNats() as server:
        best = asyncio.run(bench(server.url, n, rounds))
    print(f"{n} rollout groups of {size / 1024:.1f} KiB, best of {rounds} round(s); load average "
          f"{os.getloadavg()[0]:.2f}")
    width = max(len(k) for k in best)
    for name, rate in best.items():
        print(f"  {name.ljust(width)}  {rate:8.0f} msg/s  {rate * size / 2**20:6.1f} MiB/s")
    encode, decode = codec_microseconds(make_groups(min(n, 1000)))
    print(f"  message schema alone: encode {encode:.0f} us, decode (validated) {decode:.0f} us per group")
    small = wire_forms(make_groups(1)[0], 200 if args.quick else 2000)
    print_wire_forms("this bench's group (K=4 x 128)", small)
    large = wire_forms(real_group(), 5 if args.quick else 50)
    print_wire_forms("a real model's group (K=16 x 1024)", large)
    ratio = best["asyncrlhf, in flight"] / best["raw nats-py, in flight"]
    print(f"asyncrlhf / raw nats-py, both with publishes in flight: {ratio:.2f}x (target >= 0.5x)")
    print(f"asyncrlhf in flight / asyncrlhf one at a time: "
          f"{best['asyncrlhf, in flight'] / best['asyncrlhf, one at a time']:.2f}x")
    return {"messages": n, "bytes": size, "rates": best, "ratio": ratio, "wire": {"small": small, "large": large}}


if __name__ == "__main__":
    main()
