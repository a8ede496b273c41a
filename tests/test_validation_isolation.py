"""Tenants cannot reach each other through the bus: names that cannot collide across namespaces,
the operator's credentials only for its own bus, no credentials left in files."""

from __future__ import annotations

import asyncio
import re
import tempfile

import pytest

from asyncrlhf import api
from asyncrlhf.bus import JobBus
from asyncrlhf_operator import jetstream
from asyncrlhf_operator.validation import deletion_view, validate

NATS_NAME = re.compile(r"[A-Za-z0-9_-]{1,255}")  # stream and KV bucket names NATS accepts (no . * > / \ space)


@pytest.mark.parametrize("a,b", [(("team-a", "x"), ("team", "a-x")), (("a", "b-c"), ("a-b", "c")),
                                 (("ns", "x"), ("ns-x", "x")), (("default", "job"), ("default", "job2"))])
def test_names_of_different_jobs_never_collide(a, b):
    first, second = JobBus(*a), JobBus(*b)
    names = lambda bus: {bus.stream, bus.bucket, bus.dead_stream, bus.prefix}  # noqa: E731
    assert names(first).isdisjoint(names(second))


def test_names_are_readable_and_within_nats_rules():
    bus = JobBus("team-a", "tiny-sort")
    assert (bus.stream, bus.bucket, bus.prefix) == ("ARJ_team-a_tiny-sort", "arj_team-a_tiny-sort",
                                                    "asyncrlhf.team-a.tiny-sort")
    longest = JobBus("n" * 63, "j" * 40)
    assert all(NATS_NAME.fullmatch(name) for name in (longest.stream, longest.bucket, longest.dead_stream))


@pytest.mark.parametrize("namespace,job", [(">", "x"), ("a.b", "x"), ("a", "*"), ("A", "x"), ("a_b", "x"),
                                           ("", "x"), ("a", "x y"), ("n" * 64, "x")])
def test_a_name_that_could_reach_another_job_is_refused(namespace, job):
    with pytest.raises(ValueError, match="not a DNS label"):
        JobBus(namespace, job)


def body(**nats) -> dict:
    return {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "j", "namespace": "t"},
            "spec": {"model": {"policy": "builtin:tiny-sort"}, "nats": nats}}


def test_a_job_naming_its_own_bus_must_bring_its_credentials():
    job, error = validate(body(url="nats://evil.example:4222"))
    assert job is None and error.startswith("spec.nats.credentialsSecret: this job names its own bus")
    assert validate(body(url="nats://bus.team:4222", credentialsSecret="bus-creds"))[1] == ""
    assert validate(body())[1] == ""  # the operator's bus, with the operator's credentials


def test_deleting_a_refused_job_does_not_contact_its_url():
    nats, _ = deletion_view(body(url="nats://evil.example:4222"))
    assert nats.url == ""  # whatever it has is on the operator's bus (it was refused everywhere else)
    nats, _ = deletion_view(body(url="nats://bus.team:4222", credentialsSecret="bus-creds"))
    assert nats.url == "nats://bus.team:4222"
    nats, _ = deletion_view(body(url="nats://evil.example:4222", maxBytes="not a number"))  # invalid spec
    assert nats.url == ""


def test_creds_stay_in_memory_and_out_of_reprs(monkeypatch):
    seen = {}

    async def fake_connect(url, **options):
        seen.update(options, url=url)
        raise OSError("no server here")

    def no_files(*args, **kwargs):
        raise AssertionError("credentials written to a temporary file")

    monkeypatch.setattr(jetstream.nats, "connect", fake_connect)
    for name in ("mkstemp", "NamedTemporaryFile", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, no_files)
    creds = "-----BEGIN NATS USER JWT-----\neyJ0\n------END NATS USER JWT------\n"
    with pytest.raises(Exception, match="not reachable"):
        asyncio.run(jetstream.Buses()._connect("nats://bus:4222", jetstream.Credentials(creds=creds)))
    assert isinstance(seen["user_credentials"], jetstream.RawCredentials) and str(seen["user_credentials"]) == creds
    assert "eyJ0" not in repr(jetstream.Credentials(creds=creds, user="u", password="p"))
    assert "'p'" not in repr(jetstream.Credentials(user="u", password="p"))
