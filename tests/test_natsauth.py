"""NATS isolation between jobs, against real nats-servers: JWT mode and TLS.

A nats-server in operator (JWT) mode with a memory resolver, configured from keys this test
makes (`natsauth.bootstrap`, what `asyncrlhf nats-auth` writes for the chart): the operator's
own user creates two jobs' streams and buckets; job A's minted user runs everything A's learner
and generators do, through the workloads' own bus functions; and cannot read, write, ack,
inspect or list anything of job B's, nor create streams outside A's names, nor listen to another
connection's replies. A nats-server with TLS (certificates made here with `cryptography`)
carries a bus connection that verifies it, and refuses one that does not trust its CA.
"""

from __future__ import annotations

import asyncio
import datetime
import json
from pathlib import Path

import nats
import pytest
from nats.aio.client import RawCredentials

from asyncrlhf import workload_env
from asyncrlhf.bus import (
    DEAD, PROMPTS, ROLLOUTS, WEIGHTS, EmbeddedNats, JobBus, StreamWatch, connect, dead_letter, ensure_job_resources,
    latest_weights, publish, tls_context,
)
from asyncrlhf.kv import LEARNER_KEY, JobKV, generator_key
from asyncrlhf.messages import GeneratorStatus, LearnerProgress, WeightsAnnouncement
from asyncrlhf_operator import jetstream, natsauth

A, B = JobBus("team-a", "sort"), JobBus("team-b", "sort")
DENIED = 0.5  # seconds a request to a subject the user may not publish to is given (no reply comes)


@pytest.fixture(scope="module")
def keys() -> natsauth.Bootstrap:
    return natsauth.bootstrap("test")


@pytest.fixture(scope="module")
def jwt_server(tmp_path_factory, keys):
    with EmbeddedNats(tmp_path_factory.mktemp("jwt"), config=keys.resolver_config()) as server:
        yield server


async def as_user(url: str, creds: str, bus: JobBus | None = None):
    """A connection with `creds` (in memory), the inbox prefix the pods set, and the server's
    permission errors collected in `nc.violations`."""
    violations: list[str] = []

    async def record(err: Exception) -> None:
        violations.append(str(err))

    options = {"inbox_prefix": bus.inbox_prefix} if bus else {}
    nc = await nats.connect(url, user_credentials=RawCredentials(creds), error_cb=record,
                            max_reconnect_attempts=0, **options)
    nc.violations = violations
    return nc


async def denied(coro) -> bool:
    """The request got no answer: the server dropped it (a permissions violation)."""
    try:
        await asyncio.wait_for(coro, DENIED * 2)
    except (nats.errors.TimeoutError, asyncio.TimeoutError, nats.errors.NoRespondersError):
        return True
    return False


async def make_jobs(url: str, authority: natsauth.Authority) -> None:
    nc = await as_user(url, authority.operator_creds())
    try:
        for bus in (A, B):
            await ensure_job_resources(nc.jetstream(), bus, 1 << 24, 30.0)
        await publish(nc.jetstream(), B.subject(PROMPTS), b"b's prompt", msg_id="b-1")  # once per server
    finally:
        await nc.close()


async def test_a_jobs_user_can_do_everything_its_workloads_do(jwt_server, keys):
    authority = keys.authority()
    await make_jobs(jwt_server.url, authority)
    nc = await as_user(jwt_server.url, authority.job_creds(A), A)
    try:
        js = nc.jetstream()
        await ensure_job_resources(js, A, 1 << 24, 30.0)  # what the learner does at start and after a loss
        watch = StreamWatch(A)
        await watch.remember(js)
        assert not await watch.lost(js)
        # prompts: released, fetched by a generator, acked; the weights announcement read back
        await publish(js, A.subject(PROMPTS), b"prompt", msg_id="p-1")
        prompts = await js.pull_subscribe_bind("generators", A.stream)
        (msg,) = await prompts.fetch(1, timeout=5)
        await msg.in_progress()
        await msg.ack_sync(timeout=5)
        ann = WeightsAnnouncement(version=1, path="/snapshots/v1", checksum="ab" * 32)
        await publish(js, A.subject(WEIGHTS), ann.encode(), msg_id="w-1")
        assert (await latest_weights(js, A)).version == 1
        # rollouts: published, fetched by the learner, one set aside as a dead letter
        await publish(js, A.subject(ROLLOUTS), b"rollout", msg_id="r-1")
        rollouts = await js.pull_subscribe_bind("learner", A.stream)
        (msg,) = await rollouts.fetch(1, timeout=5)
        await dead_letter(js, A, msg, "unreadable")
        assert (await js.stream_info(A.dead_stream)).state.messages == 1
        # progress and reports in the KV bucket; the telemetry's consumer and stream reads
        kv = await JobKV.open(js, A.bucket)
        assert await kv.put(LEARNER_KEY, LearnerProgress(step=3, total_steps=9, policy_version=3))
        assert (await kv.get(LEARNER_KEY, LearnerProgress)).step == 3
        assert await kv.put(generator_key("g-1"), GeneratorStatus(generator_id="g-1", policy_version=3))
        assert set(await kv.reports()) == {generator_key("g-1")}
        assert (await js.consumer_info(A.stream, "generators")).num_pending == 0
        # a job whose stream, consumers and bucket are gone (NATS storage lost): its learner makes them
        fresh = JobBus("team-c", "new")
        other = await as_user(jwt_server.url, authority.job_creds(fresh), fresh)
        try:
            await ensure_job_resources(other.jetstream(), fresh, 1 << 24, 30.0)
            assert len(await other.jetstream().consumers_info(fresh.stream)) == 3 and other.violations == []
        finally:
            await other.close()
    except Exception as err:
        raise AssertionError(f"{type(err).__name__}: {err}; the server refused: {nc.violations}") from err
    finally:
        await nc.close()
    assert nc.violations == []


async def test_a_jobs_user_cannot_touch_another_job(jwt_server, keys):
    authority = keys.authority()
    await make_jobs(jwt_server.url, authority)
    nc = await as_user(jwt_server.url, authority.job_creds(A), A)
    try:
        js = nc.jetstream(timeout=DENIED)
        attempts = {
            "B's stream info": js.stream_info(B.stream),
            "B's prompts fetched": nc.request(f"$JS.API.CONSUMER.MSG.NEXT.{B.stream}.generators", b'{"batch":1}'),
            "B's KV read": js.get_msg(f"KV_{B.bucket}", subject=f"$KV.{B.bucket}.{LEARNER_KEY}"),
            "B's KV read (direct)": nc.request(f"$JS.API.DIRECT.GET.KV_{B.bucket}.$KV.{B.bucket}.learner", b""),
            "B's weights read": js.get_last_msg(B.stream, B.subject(WEIGHTS)),
            "B's stream deleted": js.delete_stream(B.stream),
            "B's stream recreated": js.add_stream(name=B.stream, subjects=[B.subject("x")]),
            "A's stream deleted": js.delete_stream(A.stream),
            "a stream outside A's names": js.add_stream(name="ANY", subjects=["anything.>"]),
            "every stream listed": nc.request("$JS.API.STREAM.LIST", b"{}"),
            "every stream named": nc.request("$JS.API.STREAM.NAMES", b"{}"),
            "the account's JetStream usage": nc.request("$JS.API.INFO", b""),
            "B's consumers listed": nc.request(f"$JS.API.CONSUMER.LIST.{B.stream}", b"{}"),
        }
        results = await asyncio.gather(*(denied(attempt) for attempt in attempts.values()))  # at once: ~1 s
        assert [what for what, no_answer in zip(attempts, results) if not no_answer] == []
        # publishing into B's subjects and KV (core publishes: the server drops them and says so)
        for subject in (B.subject(ROLLOUTS), B.subject(WEIGHTS), f"$KV.{B.bucket}.{LEARNER_KEY}", "anything"):
            await nc.publish(subject, b"forged")
        # listening to B's subjects, B's replies, everyone's replies
        for subject in (B.subject(">"), f"{B.inbox_prefix}.>", "_INBOX.>", "$JS.ACK.>"):
            await nc.subscribe(subject)
        await nc.flush()
        await asyncio.sleep(0.2)  # the server's -ERR lines arrive after the PONG of the flush
    finally:
        await nc.close()
    violations = "\n".join(nc.violations).lower()  # nats-py lower-cases the server's -ERR
    for subject in (f"$JS.API.STREAM.INFO.{B.stream}", f"$JS.API.STREAM.CREATE.ANY", "$JS.API.STREAM.LIST",
                    B.subject(ROLLOUTS), f"$KV.{B.bucket}.{LEARNER_KEY}", "_INBOX.>", f"{B.inbox_prefix}.>"):
        assert f'"{subject.lower()}"' in violations, violations
    # B is as it was: its prompt still there, nothing forged arrived, its stream kept its subjects
    nc = await as_user(jwt_server.url, authority.operator_creds())
    try:
        info = await nc.jetstream().stream_info(B.stream)
        assert info.state.messages == 1 and info.config.subjects == B.stream_config(1).subjects
        assert "ANY" not in await nc.jetstream().streams_info() and \
            [s.config.name for s in await nc.jetstream().streams_info() if s.config.name == "ANY"] == []
    finally:
        await nc.close()


async def test_the_pods_connection_reads_creds_and_inbox_prefix_from_the_env(jwt_server, keys, tmp_path, monkeypatch):
    await make_jobs(jwt_server.url, keys.authority())
    creds = tmp_path / "creds"
    creds.write_text(keys.authority().job_creds(A))
    monkeypatch.setenv(workload_env.NATS_CREDS, str(creds))
    monkeypatch.setenv(workload_env.NATS_INBOX_PREFIX, A.inbox_prefix)
    nc = await connect(jwt_server.url)
    try:
        assert (await nc.jetstream().stream_info(A.stream)).config.name == A.stream  # a reply in A's inbox
    finally:
        await nc.close()


def test_minted_tokens_verify_and_say_what_they_allow(keys):
    authority = keys.authority()
    claims = natsauth.decode(natsauth.jwt_of(authority.job_creds(A)), issuer=authority.signing_key)
    assert claims["nats"]["issuer_account"] == keys.account and claims["nats"]["type"] == "user"
    assert claims["name"] == "team-a/sort" and claims["sub"].startswith("U")
    assert claims["nats"]["sub"] == {"allow": ["_INBOX.team-a.sort.>"]}
    assert all("team-b" not in s for s in claims["nats"]["pub"]["allow"])
    account = natsauth.decode(keys.account_jwt)
    assert account["sub"] == keys.account and account["nats"]["signing_keys"] == [authority.signing_key]
    token = natsauth.jwt_of(authority.job_creds(A))
    head, payload, sig = token.split(".")
    forged = json.loads(natsauth._unb64(payload)) | {"name": "team-b/sort"}
    with pytest.raises(natsauth.NatsAuthError, match="valid signature"):
        natsauth.decode(f"{head}.{natsauth._b64(json.dumps(forged).encode())}.{sig}")
    assert authority.still_valid(authority.job_creds(A), A) and not authority.still_valid(authority.job_creds(A), B)
    assert not natsauth.bootstrap().authority().still_valid(authority.job_creds(A), A)  # another signing key


def test_bad_keys_are_refused_with_what_to_do():
    with pytest.raises(natsauth.NatsAuthError, match="not an nkey seed"):
        natsauth.Authority("not a seed")
    with pytest.raises(natsauth.NatsAuthError, match="not of an account"):
        natsauth.Authority(natsauth.new_seed("user"))
    assert natsauth.authority_from_env({}) is None
    seed = natsauth.new_seed("account")
    assert "SA" not in repr(natsauth.authority_from_env({natsauth.ACCOUNT_SEED_ENV: seed}))


# --- TLS ---------------------------------------------------------------------------------------


def certificates(root: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it (and a second, untrusted CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject: str, key, issuer_key, issuer: str, ca: bool):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    ca_key, other_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    files = {"ca": cert("test CA", ca_key, ca_key, "test CA", True),
             "other": cert("other CA", other_key, other_key, "other CA", True),
             "server": cert("nats", server_key, ca_key, "test CA", False),
             "client": cert("a job", client_key, ca_key, "test CA", False)}  # mutual TLS
    paths = {name: root / f"{name}.crt" for name in files}
    for name, c in files.items():
        paths[name].write_bytes(pem(c))
    for name, key in (("server.key", server_key), ("client.key", client_key)):
        paths[name] = root / name
        paths[name].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


async def test_a_bus_connection_through_tls(tmp_path, monkeypatch):
    certs = certificates(tmp_path)
    config = f'tls {{ cert_file: "{certs["server"]}"\n key_file: "{certs["server.key"]}" }}\n'
    with EmbeddedNats(tmp_path / "nats", config=config) as server:
        monkeypatch.setenv(workload_env.NATS_TLS_CA, str(certs["ca"]))
        nc = await connect(server.url)  # a pod: the CA from its mounted Secret
        try:
            await ensure_job_resources(nc.jetstream(), A, 1 << 24, 30.0)
            await publish(nc.jetstream(), A.subject(PROMPTS), b"over TLS", msg_id="t-1")
            assert nc._transport._io_writer.get_extra_info("ssl_object").version().startswith("TLSv1.")
        finally:
            await nc.close()
        # the operator: the CA as PEM in memory (a Secret's ca.crt)
        credentials = jetstream.Credentials(ca=certs["ca"].read_text())
        buses = jetstream.Buses()
        try:
            info = await (await buses.jetstream(server.url, credentials)).stream_info(A.stream)
            assert info.state.messages == 1
        finally:
            await buses.close()
        # a client that trusts another CA does not connect (and sends nothing)
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            await nats.connect(server.url, tls=tls_context(str(certs["other"])), max_reconnect_attempts=0,
                               allow_reconnect=False, connect_timeout=3)


# --- how the pods get it (plan) and the keys command ------------------------------------------------


def _job(**nats):
    from asyncrlhf import api

    return api.AsyncRLHFJob.model_validate({"apiVersion": api.API_VERSION, "kind": api.KIND,
                                            "metadata": {"name": "sort", "namespace": "team-a"},
                                            "spec": {"model": {"policy": "builtin:tiny-sort"}, "nats": nats}})


@pytest.mark.parametrize("nats,creds,ca,secrets", [
    ({}, "/var/run/asyncrlhf/nats-job/creds", "/var/run/asyncrlhf/nats-job/ca.crt", {"nats-job": "sort-nats"}),
    ({"credentialsSecret": "mine"}, "/var/run/asyncrlhf/nats/creds", "/var/run/asyncrlhf/nats-job/ca.crt",
     {"nats-credentials": "mine", "nats-job": "sort-nats"}),
    ({"url": "nats://bus.team:4222", "credentialsSecret": "mine", "tlsSecret": "bus-tls"},
     "/var/run/asyncrlhf/nats/creds", "/var/run/asyncrlhf/nats-tls/ca.crt",
     {"nats-credentials": "mine", "nats-tls": "bus-tls"}),  # a foreign bus never gets the operator's Secret
])
def test_the_pods_get_credentials_ca_and_inbox_prefix_from_the_right_secret(nats, creds, ca, secrets):
    from asyncrlhf_operator.plan import natsaccess

    job = _job(**nats)
    env = {e["name"]: e.get("value") for e in natsaccess.nats_env(job)}
    assert env[workload_env.NATS_CREDS] == creds and env[workload_env.NATS_TLS_CA] == ca
    assert env[workload_env.NATS_INBOX_PREFIX] == "_INBOX.team-a.sort"
    assert (workload_env.NATS_TLS_KEY in env) == ("tlsSecret" in nats)
    volumes, mounts = natsaccess.nats_volumes(job)
    assert {v["name"]: v["secret"]["secretName"] for v in volumes} == secrets
    assert all(v["secret"]["optional"] for v in volumes) and all(m["readOnly"] for m in mounts)


def test_nats_auth_writes_a_private_secret_once(tmp_path):
    import argparse
    import yaml

    from asyncrlhf_operator import natsauth_cli

    out = tmp_path / "nats-jwt.yaml"
    args = argparse.Namespace(name="keys", namespace="ops", output=str(out))
    assert natsauth_cli.run(args) == 0 and out.stat().st_mode & 0o777 == 0o600
    secret = yaml.safe_load(out.read_text())
    assert secret["metadata"] == {**secret["metadata"], "name": "keys", "namespace": "ops"}
    data = secret["stringData"]
    authority = natsauth.Authority(data["account-signing-seed"], data["account"])
    assert f"{data['account']}: " in data["resolver.conf"] and "resolver: MEMORY" in data["resolver.conf"]
    assert authority.signing_key != data["account"]  # a signing key, not the account's identity key
    assert natsauth_cli.run(args) == 2  # never overwrites keys that jobs may be using


async def test_mutual_tls_with_the_client_certificate_from_the_pods_files_or_the_operators_memory(tmp_path, monkeypatch):
    certs = certificates(tmp_path)
    config = (f'tls {{ cert_file: "{certs["server"]}"\n key_file: "{certs["server.key"]}"\n'
              f' ca_file: "{certs["ca"]}"\n verify: true }}\n')
    with EmbeddedNats(tmp_path / "nats", config=config) as server:
        with pytest.raises(Exception):  # the CA alone is not enough: the server wants a client certificate
            await nats.connect(server.url, tls=tls_context(str(certs["ca"])), max_reconnect_attempts=0,
                               allow_reconnect=False, connect_timeout=3)
        for var, name in ((workload_env.NATS_TLS_CA, "ca"), (workload_env.NATS_TLS_CERT, "client"),
                          (workload_env.NATS_TLS_KEY, "client.key")):
            monkeypatch.setenv(var, str(certs[name]))  # a pod: spec.nats.tlsSecret's three files
        nc = await connect(server.url)
        try:
            await ensure_job_resources(nc.jetstream(), A, 1 << 24, 30.0)
        finally:
            await nc.close()
        credentials = jetstream.Credentials(ca=certs["ca"].read_text(), cert=certs["client"].read_text(),
                                            key=certs["client.key"].read_text())  # from the Secret, in memory
        buses = jetstream.Buses()
        try:
            assert (await (await buses.jetstream(server.url, credentials)).stream_info(A.stream)).config.name == A.stream
        finally:
            await buses.close()


def test_a_secret_whose_seed_is_not_its_users_is_minted_again():
    authority = natsauth.bootstrap().authority()
    good = authority.job_creds(A)
    other_seed = natsauth.new_seed("user")
    swapped = good.replace(good.split("-----BEGIN USER NKEY SEED-----\n")[1].split("\n")[0], other_seed)
    assert authority.still_valid(good, A) and not authority.still_valid(swapped, A)
    assert not authority.still_valid("", A) and not authority.still_valid("garbage", A)
