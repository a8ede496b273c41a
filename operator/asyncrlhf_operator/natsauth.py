"""NATS decentralised (JWT) auth: the operator mints one NATS user per job.

Why per job: a job's stream, consumers, KV bucket and subjects are all named after
(namespace, job) (`asyncrlhf.bus.JobBus`), so a user whose permissions name exactly those can
reach nothing of any other job, in its own namespace or another. A per-namespace user would let
one job of a team read, ack (delete) and forge another job's rollouts and weights announcements.

The chain of trust (NATS JWT v2, https://docs.nats.io/running-a-nats-service/configuration/
securing_nats/jwt): an operator key signs the account JWTs the server preloads (memory
resolver); the jobs' account lists a signing key; the asyncrlhf operator holds that signing key
(a Secret) and signs user JWTs with it — its own (no limits inside the account) and one per job
(`job_permissions`). The server checks every publish and subscribe against the user's JWT.
A user JWT + its seed make a `.creds` file: the per-job Secret's `creds` key, which the pods
get as ASYNCRLHF_NATS_CREDS.

The claims are written here (header, `jti` = base32(sha512/256(claims with an empty jti)),
ed25519 signature over `header.payload`, all base64url without padding); nkeys/PyNaCl sign.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import nacl.exceptions
import nacl.signing
import nkeys

from asyncrlhf.bus import JobBus

HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
ACCOUNT_SEED_ENV = "ASYNCRLHF_NATS_ACCOUNT_SEED"  # the jobs' account signing key (a Secret; never logged)
ACCOUNT_ENV = "ASYNCRLHF_NATS_ACCOUNT"  # the account's public key (empty: the seed's own)
NO_LIMIT = -1
_PREFIXES = {"operator": nkeys.PREFIX_BYTE_OPERATOR, "account": nkeys.PREFIX_BYTE_ACCOUNT,
             "user": nkeys.PREFIX_BYTE_USER}


class NatsAuthError(ValueError):
    """A key or token that cannot be used: what it is and how to fix it."""


# --- keys and tokens -------------------------------------------------------------------------


def new_seed(kind: str) -> str:
    """A fresh nkey seed ("SO...", "SA...", "SU...") for an operator, account or user."""
    raw = bytes(nacl.signing.SigningKey.generate())
    return nkeys.encode_seed(raw, _PREFIXES[kind]).decode()


def keypair(seed: str, what: str = "seed") -> nkeys.KeyPair:
    try:
        return nkeys.from_seed(seed.strip().encode())
    except (nkeys.NkeysError, ValueError, TypeError) as err:
        raise NatsAuthError(f"{what} is not an nkey seed (\"S...\", as `asyncrlhf nats-auth` or "
                            f"`nsc` writes it): {type(err).__name__}") from None


def public_key(seed: str, what: str = "seed") -> str:
    return keypair(seed, what).public_key.decode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def encode(subject: str, name: str, nats: dict[str, Any], signer_seed: str, *,
           expires: int = 0, now: Optional[float] = None) -> str:
    """A signed JWT: `sub` = subject's public key, `iss` = the signer's, `nats` the typed part."""
    signer = keypair(signer_seed, "the signing seed")
    data: dict[str, Any] = {"jti": "", "iat": int(time.time() if now is None else now),
                            "iss": signer.public_key.decode(), "name": name, "sub": subject}
    if expires:
        data["exp"] = expires
    # the claim's id: a hash of its standard fields with an empty id (what nats-io/jwt does)
    data["jti"] = base64.b32encode(hashlib.new("sha512_256", _json(data)).digest()).decode().rstrip("=")
    signing_input = f"{_b64(_json(HEADER))}.{_b64(_json({**data, 'nats': {**nats, 'version': 2}}))}"
    return f"{signing_input}.{_b64(signer.sign(signing_input.encode()))}"


def decode(token: str, issuer: str = "") -> dict[str, Any]:
    """The claims of a JWT whose signature verifies (against `issuer` when given)."""
    try:
        head, payload, sig = token.strip().split(".")
        claims = json.loads(_unb64(payload))
        nacl.signing.VerifyKey(_raw_public(claims["iss"])).verify(f"{head}.{payload}".encode(), _unb64(sig))
    except (ValueError, KeyError, TypeError, nacl.exceptions.BadSignatureError) as err:
        raise NatsAuthError(f"not a NATS JWT with a valid signature: {type(err).__name__}") from None
    if issuer and claims["iss"] != issuer:
        raise NatsAuthError(f"the JWT is signed by {claims['iss']}, not by {issuer}")
    return claims


def _raw_public(key: str) -> bytes:
    raw = base64.b32decode(key + "=" * (-len(key) % 8))
    return raw[1:-2]  # prefix byte, 32 key bytes, crc16


def creds(jwt: str, seed: str) -> str:
    """The `.creds` file nats clients read (the format `nsc` writes)."""
    return (f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
            "************************* IMPORTANT *************************\n"
            "NKEY Seed printed below can be used to sign and prove identity.\n"
            "NKEYs are sensitive and should be treated as secrets.\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n"
            "*************************************************************\n")


def jwt_of(creds_text: str) -> str:
    """The user JWT inside a `.creds` file."""
    lines = [line.strip() for line in creds_text.splitlines()]
    try:
        return lines[lines.index("-----BEGIN NATS USER JWT-----") + 1]
    except (ValueError, IndexError):
        raise NatsAuthError("not a .creds file (no user JWT)") from None


# --- claims ----------------------------------------------------------------------------------


def operator_jwt(operator_seed: str, name: str, system_account: str) -> str:
    nats = {"type": "operator", "system_account": system_account}
    return encode(public_key(operator_seed), name, nats, operator_seed)


def account_jwt(operator_seed: str, account: str, name: str, signing_keys: list[str], *,
                jetstream: bool) -> str:
    """An account JWT signed by the operator; JetStream on (unlimited, the server's own limits
    apply) or off (the system account)."""
    limits: dict[str, Any] = {"subs": NO_LIMIT, "data": NO_LIMIT, "payload": NO_LIMIT, "imports": NO_LIMIT,
                              "exports": NO_LIMIT, "wildcards": True, "conn": NO_LIMIT, "leaf": NO_LIMIT}
    if jetstream:
        limits.update({"mem_storage": NO_LIMIT, "disk_storage": NO_LIMIT, "streams": NO_LIMIT,
                       "consumer": NO_LIMIT})
    nats = {"type": "account", "limits": limits, "signing_keys": signing_keys,
            "default_permissions": {"pub": {}, "sub": {}}}
    return encode(account, name, nats, operator_seed)


def user_jwt(signing_seed: str, account: str, user: str, name: str,
             permissions: Optional[Mapping[str, Any]] = None) -> str:
    """A user of `account` signed with one of its keys; no `permissions`: everything in the account."""
    nats: dict[str, Any] = {"type": "user", "subs": NO_LIMIT, "data": NO_LIMIT, "payload": NO_LIMIT,
                            "pub": {}, "sub": {}}
    nats.update(permissions or {})
    if public_key(signing_seed) != account:
        nats["issuer_account"] = account
    return encode(user, name, nats, signing_seed)


def job_permissions(bus: JobBus) -> dict[str, Any]:
    """Exactly what one job's learner and generators do on the bus (tested against a real server in
    tests/test_natsauth.py): publish to the job's subjects and KV keys; the JetStream API for the
    job's three streams (create/update/info, no delete) and their consumers; fetch, ack and flow
    control on them; replies only to the job's own inbox prefix (`bus.inbox_prefix`: nats-py's
    inbox_prefix, which the pods set), so no job reads another's replies or fetched messages."""
    kv = f"KV_{bus.bucket}"
    api = [f"$JS.API.STREAM.{op}.{s}" for s in (bus.stream, bus.dead_stream, kv) for op in ("INFO", "CREATE", "UPDATE")]
    api += [f"$JS.API.CONSUMER.LIST.{bus.stream}", f"$JS.API.CONSUMER.INFO.{bus.stream}.*",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{bus.stream}.*",  # the durables (after a loss of the stream)
            f"$JS.API.CONSUMER.MSG.NEXT.{bus.stream}.*", f"$JS.ACK.{bus.stream}.>",  # fetch and ack
            f"$JS.API.STREAM.MSG.GET.{bus.stream}", f"$JS.API.STREAM.MSG.GET.{kv}",  # latest weights, a KV get
            # a KV listing: an ordered consumer, made, read, flow-controlled and deleted
            f"$JS.API.CONSUMER.CREATE.{kv}", f"$JS.API.CONSUMER.CREATE.{kv}.>", f"$JS.API.CONSUMER.INFO.{kv}.*",
            f"$JS.API.CONSUMER.DELETE.{kv}.*", f"$JS.FC.{kv}.>"]
    return {"pub": {"allow": [f"{bus.prefix}.>", f"$KV.{bus.bucket}.>", *api]},
            "sub": {"allow": [f"{bus.inbox_prefix}.>"]}}


# --- the operator's authority ----------------------------------------------------------------


@dataclass(frozen=True)
class Authority:
    """The jobs' account signing key, held by the operator: it mints the operator's own user and
    one user per job."""

    signing_seed: str = dataclasses.field(repr=False)
    account: str = ""

    def __post_init__(self) -> None:
        key = public_key(self.signing_seed, f"${ACCOUNT_SEED_ENV}")
        if not key.startswith("A"):
            raise NatsAuthError(f"${ACCOUNT_SEED_ENV} is the seed of {key[:1]}... key, not of an account "
                                "(signing) key (\"SA...\")")
        if not self.account:
            object.__setattr__(self, "account", key)
        elif not self.account.startswith("A"):
            raise NatsAuthError(f"${ACCOUNT_ENV} {self.account[:8]}... is not an account public key (\"A...\")")

    @property
    def signing_key(self) -> str:
        return public_key(self.signing_seed)

    def operator_creds(self) -> str:
        seed = new_seed("user")
        return creds(user_jwt(self.signing_seed, self.account, public_key(seed), "asyncrlhf-operator"), seed)

    def job_creds(self, bus: JobBus) -> str:
        seed = new_seed("user")
        jwt = user_jwt(self.signing_seed, self.account, public_key(seed), f"{bus.namespace}/{bus.job}",
                       job_permissions(bus))
        return creds(jwt, seed)

    def still_valid(self, creds_text: str, bus: JobBus) -> bool:
        """Is this job's `.creds` (from its Secret) signed by this authority, for this job, with
        today's permissions? Kept then (no churn on every resync); else minted again."""
        try:
            claims = decode(jwt_of(creds_text), issuer=self.signing_key)
            seed = creds_text.split("-----BEGIN USER NKEY SEED-----", 1)[1].split()[0]
            if public_key(seed) != claims.get("sub"):
                return False  # a seed that is not the user's: the server would refuse it
        except (NatsAuthError, IndexError):
            return False
        nats = claims.get("nats") or {}
        return claims.get("name") == f"{bus.namespace}/{bus.job}" and nats.get("issuer_account", claims["iss"]) == \
            self.account and \
            nats.get("pub") == job_permissions(bus)["pub"] and nats.get("sub") == job_permissions(bus)["sub"]


def authority_from_env(env: Mapping[str, str] = os.environ) -> Optional[Authority]:
    """JWT mode when $ASYNCRLHF_NATS_ACCOUNT_SEED is set (the chart's nats.auth.mode jwt), else None."""
    seed = env.get(ACCOUNT_SEED_ENV, "").strip()
    return Authority(seed, env.get(ACCOUNT_ENV, "").strip()) if seed else None


# --- a NATS server in JWT mode: the keys and its configuration ----------------------------------


@dataclass(frozen=True)
class Bootstrap:
    """Everything a JWT-mode NATS and the operator need, made once (`asyncrlhf nats-auth`): the
    operator and system account JWTs, the jobs' account JWT (all public: the server's config),
    and the jobs' account signing seed (secret: the operator's)."""

    operator_jwt: str
    system_account: str
    system_jwt: str
    account: str
    account_jwt: str
    signing_seed: str = dataclasses.field(repr=False)

    def resolver_config(self) -> str:
        """The server configuration's trust part: include it in nats.conf (memory resolver)."""
        return (f"operator: {self.operator_jwt}\nsystem_account: {self.system_account}\nresolver: MEMORY\n"
                f"resolver_preload: {{\n  {self.system_account}: {self.system_jwt}\n"
                f"  {self.account}: {self.account_jwt}\n}}\n")

    def authority(self) -> Authority:
        return Authority(self.signing_seed, self.account)

    def secret_data(self) -> dict[str, str]:
        """The keys of the chart's JWT Secret (nats.auth.jwt.existingSecret)."""
        return {"resolver.conf": self.resolver_config(), "account": self.account,
                "account-signing-seed": self.signing_seed}


def bootstrap(name: str = "asyncrlhf") -> Bootstrap:
    """Fresh keys: operator, system account, jobs account and its signing key. The operator and
    account identity seeds are not kept: the trust chain is fixed until the next bootstrap, and
    only the signing key (which can only make users of the jobs' account) is ever online."""
    operator, system, account, signing = (new_seed(k) for k in ("operator", "account", "account", "account"))
    system_pub, account_pub = public_key(system), public_key(account)
    return Bootstrap(
        operator_jwt=operator_jwt(operator, name, system_pub), system_account=system_pub,
        system_jwt=account_jwt(operator, system_pub, "SYS", [], jetstream=False),
        account=account_pub,
        account_jwt=account_jwt(operator, account_pub, f"{name}-jobs", [public_key(signing)], jetstream=True),
        signing_seed=signing)
