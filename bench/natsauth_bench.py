"""What JWT mode and TLS cost on the bus: the same rollout traffic through four servers, side by side.

    python bench/natsauth_bench.py [--messages 3000] [--rounds 3] [--size 9000]

Four real nats-servers with JetStream, started here: user/password (the chart's default), JWT
mode with the operator-minted per-job user (its ~30 permission subjects checked on every publish
and subscription), TLS with a password, and JWT + TLS. Each variant publishes `--messages`
payloads of `--size` bytes to the job's stream with the generators' path (`bus.publish_all`:
de-duplication ids, 64 PubAcks in flight), then the learner's path: fetch 256 at a time and ack
each. Rounds alternate the order; the best round of each counts. Also timed: minting one job's
creds (`Authority.job_creds`) and a connect (the JWT handshake signs the server's nonce).
Prints ratios to the password baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "workloads"), str(ROOT / "operator"), str(ROOT / "tests")]

import nats  # noqa: E402
from nats.aio.client import RawCredentials  # noqa: E402

from asyncrlhf.bus import LEARNER_CONSUMER, ROLLOUTS, JobBus, ensure_job_resources, publish_all, tls_context  # noqa: E402
from asyncrlhf_operator import natsauth  # noqa: E402
from test_natsauth import Server, certificates  # noqa: E402

BUS = JobBus("bench", "job")
PASSWORD = "Kbench0nly"


def variants(root: Path, keys: natsauth.Bootstrap) -> dict[str, tuple[str, dict]]:
    """name -> (server config, client options)."""
    certs = certificates(root)
    tls = f'tls {{ cert_file: "{certs["server"]}"\n key_file: "{certs["server.key"]}" }}\n'
    password = f"authorization {{ user: bench\n password: {PASSWORD} }}\n"
    jwt_user = {"user_credentials": RawCredentials(keys.authority().job_creds(BUS)), "inbox_prefix": BUS.inbox_prefix}
    secure = {"tls": tls_context(str(certs["ca"]))}
    return {"password": (password, {"user": "bench", "password": PASSWORD}),
            "jwt": (keys.resolver_config(), jwt_user),
            "password+tls": (password + tls, {"user": "bench", "password": PASSWORD, **secure}),
            "jwt+tls": (keys.resolver_config() + tls, {**jwt_user, **secure})}


async def one_round(url: str, options: dict, messages: int, size: int, round_no: int) -> tuple[float, float]:
    """(seconds to connect, seconds to publish + fetch + ack every message)."""
    t0 = time.perf_counter()
    nc = await nats.connect(url, **options)
    connected = time.perf_counter() - t0
    try:
        js = nc.jetstream()
        await ensure_job_resources(js, BUS, 1 << 30, 60.0)
        payload = b"r" * size
        sub = await js.pull_subscribe_bind(LEARNER_CONSUMER, BUS.stream)
        t0 = time.perf_counter()
        await publish_all(js, [(BUS.subject(ROLLOUTS), payload, f"{round_no}-{i}") for i in range(messages)])
        got = 0
        while got < messages:
            for msg in await sub.fetch(256, timeout=10):
                await msg.ack()
                got += 1
        await nc.flush()
        return connected, time.perf_counter() - t0
    finally:
        await nc.close()


async def main(args: argparse.Namespace) -> None:
    logging.getLogger("asyncio").setLevel(logging.ERROR)  # "eof_received() has no effect when using ssl"
    keys = natsauth.bootstrap("bench")
    t0 = time.perf_counter()
    for _ in range(100):
        keys.authority().job_creds(BUS)
    mint_ms = (time.perf_counter() - t0) * 10
    root = Path(tempfile.mkdtemp(prefix="natsauth-bench-"))
    specs = variants(root, keys)
    best: dict[str, tuple[float, float]] = {}
    servers = {name: Server(root / name, config).__enter__() for name, (config, _) in specs.items()}
    try:
        for r in range(args.rounds):
            order = list(specs) if r % 2 == 0 else list(reversed(specs))
            for name in order:
                connect_s, run_s = await one_round(servers[name].url, specs[name][1], args.messages, args.size, r)
                old = best.get(name, (float("inf"), float("inf")))
                best[name] = (min(old[0], connect_s), min(old[1], run_s))
    finally:
        for server in servers.values():
            server.__exit__()
    base = best["password"][1]
    print(f"{args.messages} messages x {args.size} B, best of {args.rounds} rounds; minting one job's creds: "
          f"{mint_ms:.2f} ms")
    print(f"{'variant':14} {'connect ms':>10} {'msg/s':>9} {'vs password':>12}")
    for name, (connect_s, run_s) in best.items():
        print(f"{name:14} {connect_s * 1000:10.1f} {args.messages / run_s:9.0f} {base / run_s:11.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=9000)
    asyncio.run(main(parser.parse_args()))
