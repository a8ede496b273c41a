"""The process kubelet's pure helpers (tests/kubelet.py), table by table: what a pod's command,
environment and mounts become on this machine. Kubernetes' own rules are the expected values
($(VAR) expansion as in the container API docs, secretKeyRef data and stringData, fieldRef paths)."""

from __future__ import annotations

import base64
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
import threading

import pytest

from kubelet import (
    NotReady, Pod, _finished, expand, field_value, map_path, map_port, probe_ok, probe_port, secret_data,
)

ENV = {"A": "1", "B": "two", "NESTED": "$(A)", "DOTTED.NAME": "d"}
EXPAND = [
    ("$(A)", "1"),
    ("x-$(A)-$(B)", "x-1-two"),
    ("$(MISSING)", "$(MISSING)"),  # undefined: left as written
    ("$$(A)", "$(A)"),  # $$ escapes
    ("$$$(A)", "$1"),
    ("$(NESTED)", "$(A)"),  # expanded once, not recursively
    ("$(DOTTED.NAME)", "d"),
    ("$A", "$A"),  # shell syntax is not Kubernetes syntax
    ("$(1BAD)", "$(1BAD)"),  # not a variable name
    ("", ""),
]


@pytest.mark.parametrize("value,expected", EXPAND)
def test_expand(value, expected):
    assert expand(value, ENV) == expected


MOUNTS = {"/snapshots": "/node/pvc", "/etc/asyncrlhf": "/node/config", "/snapshots/deep": "/node/deep"}
MAP_PATH = [
    ("/snapshots", "/node/pvc"),
    ("/snapshots/v3/model.safetensors", "/node/pvc/v3/model.safetensors"),
    ("/snapshots/deep/x", "/node/deep/x"),  # the longest mountPath wins
    ("/snapshotsX/y", "/snapshotsX/y"),  # a prefix of a name is not a parent directory
    ("--config=/etc/asyncrlhf/job.yaml", "--config=/node/config/job.yaml"),  # after '='
    ("a=b=/snapshots/v1", "a=b=/node/pvc/v1"),  # after the last '='
    ("relative/snapshots", "relative/snapshots"),
    ("nats://nats:4222", "nats://nats:4222"),
    ("/usr/bin/python", "/usr/bin/python"),  # under no mount: the image's own path
]


@pytest.mark.parametrize("value,expected", MAP_PATH)
def test_map_path(value, expected):
    assert map_path(value, MOUNTS) == expected


PORTS = {8081: 40001, 9410: 40002}
MAP_PORT = [
    ("0.0.0.0:8081", "127.0.0.1:40001"),
    (":9410", "127.0.0.1:40002"),
    ("127.0.0.1:8081", "127.0.0.1:40001"),
    ("0.0.0.0:8082", "0.0.0.0:8082"),  # not a containerPort of the pod
    ("nats://nats:4222", "nats://nats:4222"),  # not a listen address
    ("10.0.0.1:8081", "10.0.0.1:8081"),  # someone else's address
    ("8081", "8081"),
]


@pytest.mark.parametrize("value,expected", MAP_PORT)
def test_map_port(value, expected):
    assert map_port(value, PORTS) == expected


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


SECRETS = [
    (None, None),  # not found
    ({}, {}),
    ({"data": {"user": b64("u"), "password": b64("p:w")}}, {"user": b"u", "password": b"p:w"}),
    ({"stringData": {"token": "t"}}, {"token": b"t"}),
    ({"data": {"k": b64("old")}, "stringData": {"k": "new"}}, {"k": b"new"}),  # stringData wins, as an apiserver merges
]


@pytest.mark.parametrize("obj,expected", SECRETS)
def test_secret_data(obj, expected):
    assert secret_data(obj) == expected


def pod(**template_spec) -> Pod:
    template = {"metadata": {"labels": {"app": "gen"}, "annotations": {"batch.kubernetes.io/job-completion-index": "2"}},
                "spec": {"containers": [{"name": "c"}], **template_spec}}
    return Pod(name="demo-generator-abc", namespace="team", owner={"uid": "u"}, template=template,
               template_hash="h", dir=Path("/nowhere"))


FIELDS = [
    ("metadata.name", "demo-generator-abc"),
    ("metadata.namespace", "team"),
    ("metadata.labels['app']", "gen"),
    ("metadata.labels['missing']", ""),
    ("metadata.annotations['batch.kubernetes.io/job-completion-index']", "2"),
    ("spec.nodeName", "kubelet-local"),
    ("spec.serviceAccountName", "default"),
    ("status.podIP", "127.0.0.1"),
]


@pytest.mark.parametrize("path,expected", FIELDS)
def test_field_value(path, expected):
    assert field_value(pod(), path) == expected


def test_a_field_the_harness_does_not_know_is_a_config_error_as_on_a_cluster():
    assert field_value(pod(serviceAccountName="worker"), "spec.serviceAccountName") == "worker"
    with pytest.raises(NotReady) as err:
        field_value(pod(), "status.hostIPs")
    assert err.value.reason == "CreateContainerConfigError"


CONTAINER = {"ports": [{"name": "probes", "containerPort": 8081}, {"name": "metrics", "containerPort": 9410}]}
PROBE_PORTS = [
    ({"httpGet": {"path": "/readyz", "port": "probes"}}, 40001),
    ({"httpGet": {"path": "/metrics", "port": 9410}}, 40002),
    ({"httpGet": {"path": "/x", "port": "9410"}}, 40002),
    ({"httpGet": {"path": "/x", "port": "nope"}}, None),
    ({"httpGet": {"path": "/x", "port": 1234}}, None),
]


@pytest.mark.parametrize("probe,expected", PROBE_PORTS)
def test_probe_port(probe, expected):
    assert probe_port(probe, CONTAINER, PORTS) == expected


class _Answers(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response({"/ok": 200, "/moved": 302, "/no": 503}.get(self.path, 404))
        self.end_headers()

    def log_message(self, *args):
        pass


def test_probe_ok_calls_the_pods_port():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ports = {8081: server.server_address[1]}
    container = {"ports": [{"name": "probes", "containerPort": 8081}]}
    try:
        answers = {path: probe_ok({"httpGet": {"path": path, "port": "probes"}}, container, ports)
                   for path in ("/ok", "/no", "/missing")}
        assert answers == {"/ok": True, "/no": False, "/missing": False}
        assert probe_ok(None, container, ports)  # no readinessProbe: ready while running
        assert not probe_ok({"exec": {"command": ["true"]}}, container, ports)  # not emulated: never ready
    finally:
        server.shutdown()
        server.server_close()
    assert not probe_ok({"httpGet": {"path": "/ok", "port": "probes"}}, container, ports)  # nothing listens


FINISHED = [
    ({}, False),
    ({"status": {"conditions": [{"type": "Complete", "status": "True"}]}}, True),
    ({"status": {"conditions": [{"type": "Failed", "status": "True"}]}}, True),
    ({"status": {"conditions": [{"type": "Complete", "status": "False"}]}}, False),
    ({"status": {"conditions": [{"type": "Suspended", "status": "True"}]}}, False),
]


@pytest.mark.parametrize("job,finished", FINISHED)
def test_finished(job, finished):
    assert _finished(job) is finished
