"""A process kubelet over kmock: the operator's pods run as local processes.

kmock stores the objects the operator creates, but nothing runs them. This harness plays the
parts a cluster adds: the Deployment and Job controllers (how many pods, their names, the
status they write back) and the kubelet (starting each pod's container, restarting or
stopping it). Each replica of a Deployment and each completion index of an Indexed Job becomes
one local process:

- argv: the container's `command` + `args` exactly as written, `$(VAR)` expanded as Kubernetes
  does; `asyncrlhf` resolves through PATH to this environment's entry point (the image's
  `ENTRYPOINT` is the same script: `docker/workloads-cpu.Dockerfile`, whose `ENV` lines are
  `IMAGE_ENV` below, LD_PRELOAD of tcmalloc left out). Nothing of the test's own environment
  leaks in.
- env: `envFrom` then `env`; `valueFrom` resolved from kmock: `secretKeyRef`,
  `configMapKeyRef` (missing and not optional: the pod waits in CreateContainerConfigError, as
  on a cluster), `fieldRef` (metadata.name/namespace/uid/labels/annotations, spec.nodeName,
  spec.serviceAccountName, status.podIP/hostIP); Indexed Job pods get the completion-index
  annotation and label and JOB_COMPLETION_INDEX, as the Job controller gives them; HOSTNAME
  is the pod's hostname.
- volumes: every `volumeMount` is a local directory: one per PersistentVolumeClaim (shared by
  every pod that mounts it, kept across pods: `volumes/pvc-<ns>-<claim>`), ConfigMaps and
  Secrets written out as files (keys, or `items`), emptyDirs one per pod (gone with the pod).
  There is no mount namespace, so a path is mapped instead: an argument or env value that is a
  mountPath or lies under one (whole, or after `=`) is rewritten to the local directory. The
  workloads read every path from their arguments and environment, so they see only mapped
  paths; a path the code hard-wired would not be mapped (and would show up as a failure).
- ports: each containerPort gets a free local port per pod (several pods run on one loopback),
  and an env value `<host>:<containerPort>` (a listen address, e.g. ASYNCRLHF_PROBES_ADDRESS)
  becomes `127.0.0.1:<its port>`. A readinessProbe (httpGet, the port by name or number) is
  called on every pass: a Deployment's `readyReplicas` counts the pods whose probe answers 2xx/3xx.
- the one other substitution: `nats_aliases` maps an in-cluster NATS address (a Service DNS
  name) in env values to the local nats-server the test started. The tests here run the
  operator with the local URL as its `--nats-url` (what the chart passes as its Service), so
  the pods get that URL verbatim and no alias is needed.

Written back: Deployment `replicas/readyReplicas/availableReplicas/updatedReplicas/
observedGeneration`; Job `active/ready/succeeded/failed/completedIndexes/startTime/
completionTime/conditions` (Complete; Failed with BackoffLimitExceeded past `backoffLimit`;
Suspended); a Pod object per process with its phase and container state (running, the exit
code when terminated, CrashLoopBackOff with the last exit code for a Deployment pod that
exits, which is restarted after 10 s doubling as kubelet does; a failed container with
terminationMessagePolicy FallbackToLogsOnError gets its log's tail as its message). A pod whose owner is deleted,
scaled down, suspended or replaced (a new uid under the same name) is stopped before any new
pod starts: SIGTERM to its process group, SIGKILL after terminationGracePeriodSeconds.

Not emulated: scheduling (nodeSelector, tolerations, affinity: every pod starts at once),
resource requests/limits (no cgroups, no OOMKilled, GPUs), NetworkPolicy (everything is
loopback), image contents (this environment stands for the image), securityContext (runs as
the test's user; readOnlyRootFilesystem and readOnly mounts are not enforced; the working
directory is an empty per-pod folder), cluster DNS (Service names do not resolve), liveness and
startup probes (a hung process is not restarted; a pod without a readinessProbe is ready while it
runs), exec and tcpSocket probes, ConfigMap/Secret updates after a pod started, garbage collection
of other kinds. Reconciliation is level-triggered: every `interval` seconds the harness lists
Deployments and Jobs and converges, like a controller's resync, instead of a watch.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from kmock_support import api_call

COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
VENV_BIN = str(Path(sys.executable).parent)
IMAGE_ENV = {
    "PATH": f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/tmp",
    "VLLM_TARGET_DEVICE": "cpu", "DS_ACCELERATOR": "cpu",
}
CRASH_BACKOFF = (10.0, 300.0)  # kubelet's restart back-off: 10 s doubling, at most 5 minutes


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Api:
    """Just enough of an API client: JSON over HTTP to kmock."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def call(self, method: str, path: str, body: Any = None) -> Optional[dict[str, Any]]:
        return api_call(self.url, method, path, body)

    def items(self, path: str) -> list[dict[str, Any]]:
        return [o for o in ((self.call("GET", path) or {}).get("items") or [])
                if not (o.get("metadata") or {}).get("deletionTimestamp")]


def core(ns: str, plural: str, name: str = "") -> str:
    return f"/api/v1/namespaces/{ns}/{plural}" + (f"/{name}" if name else "")


def group(gv: str, ns: str, plural: str, name: str = "") -> str:
    return f"/apis/{gv}/namespaces/{ns}/{plural}" + (f"/{name}" if name else "")


class NotReady(Exception):
    """A pod cannot start yet (a missing Secret, ConfigMap or claim): the reason, as kubelet says it."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message


@dataclass
class Pod:
    name: str
    namespace: str
    owner: dict[str, Any]  # the ownerReference: apiVersion, kind, name, uid
    template: dict[str, Any]
    template_hash: str
    dir: Path
    index: Optional[int] = None
    proc: Optional[subprocess.Popen] = None
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    restarts: int = 0
    exit_code: Optional[int] = None  # a Job's pod, or a stopped one: terminated for good
    last_exit: Optional[int] = None  # a Deployment's pod: its container's last exit (it restarts)
    reaped: Optional[subprocess.Popen] = None
    restart_at: float = 0.0
    waiting: Optional[NotReady] = None
    stopped: bool = False
    ports: dict[int, int] = field(default_factory=dict)  # containerPort -> the local port it listens on

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def log(self) -> Path:
        return self.dir / "container.log"

    @property
    def labels(self) -> dict[str, str]:
        return dict((self.template.get("metadata") or {}).get("labels") or {})

    @property
    def container(self) -> dict[str, Any]:
        return self.template["spec"]["containers"][0]


class Kubelet:
    """Runs the pods of the Deployments and Indexed Jobs in `namespace` (see the module docstring)."""

    def __init__(self, api_url: str, root: Path, namespace: str = "default", *,
                 nats_aliases: Optional[dict[str, str]] = None, interval: float = 0.3) -> None:
        self.api, self.root, self.namespace = Api(api_url), Path(root), namespace
        self.nats_aliases = dict(nats_aliases or {})
        self.interval = interval
        self.pods: dict[str, Pod] = {}  # by pod name, running or terminated, until removed
        self.history: list[Pod] = []  # every pod ever started, for the tests' questions
        self.errors: list[str] = []  # tracebacks of failed sync passes
        self._jobs: dict[str, dict[str, Any]] = {}  # Job uid -> controller state
        self._written: dict[str, Any] = {}  # status last written per object path
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kubelet", daemon=True)

    # --- life cycle ----------------------------------------------------------------------

    def __enter__(self) -> "Kubelet":
        self.root.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the loop and every process it started (also when a test failed)."""
        self._stop.set()
        self._thread.join(30)
        with self._lock:
            for pod in list(self.pods.values()):
                self._stop_process(pod, grace=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    self.sync()
            except Exception:  # keep running: a test sees the error through `errors`
                self.errors.append(traceback.format_exc())
            self._stop.wait(self.interval)

    # --- what tests ask --------------------------------------------------------------------

    def running(self, component: Optional[str] = None) -> list[Pod]:
        with self._lock:
            return [p for p in self.pods.values() if p.running and (
                component is None or p.labels.get("app.kubernetes.io/component") == component)]

    def started(self, component: str) -> list[Pod]:
        with self._lock:
            return [p for p in self.history if p.labels.get("app.kubernetes.io/component") == component]

    def kill(self, pod: Pod, sig: int = signal.SIGKILL) -> None:
        """What an OOM kill or a node problem does to a container: the process group dies."""
        with self._lock:
            _signal_group(pod.proc, sig)

    def tail(self, lines: int = 30) -> str:
        """The last lines of every pod's log (for failure messages)."""
        out = []
        for pod in self.history:
            text = pod.log.read_text(errors="replace").splitlines()[-lines:] if pod.log.exists() else []
            out.append(f"--- {pod.name} (exit {pod.exit_code}) ---\n" + "\n".join(text))
        return "\n".join(out + self.errors[-3:])

    # --- the controllers' pass -------------------------------------------------------------

    def sync(self) -> None:
        ns = self.namespace
        deployments = self.api.items(group("apps/v1", ns, "deployments"))
        jobs = self.api.items(group("batch/v1", ns, "jobs"))
        self._reap()
        # a finished Job keeps its pods (and their emptyDirs) until it is deleted, as on a cluster
        live = {d["metadata"]["uid"] for d in deployments} | {
            j["metadata"]["uid"] for j in jobs if not j["spec"].get("suspend")}
        for pod in [p for p in self.pods.values() if p.owner["uid"] not in live]:
            self._remove(pod)  # owner deleted, replaced, suspended or finished: stop first, start after
        for uid in set(self._jobs) - {j["metadata"]["uid"] for j in jobs}:
            del self._jobs[uid]
        for deployment in deployments:
            self._sync_deployment(deployment)
        for job in jobs:
            self._sync_job(job)

    def _owned(self, uid: str) -> list[Pod]:
        return [p for p in self.pods.values() if p.owner["uid"] == uid]

    def _sync_deployment(self, d: dict[str, Any]) -> None:
        meta, spec = d["metadata"], d["spec"]
        template, want = spec["template"], spec.get("replicas", 1)
        thash = _hash(template)
        pods = self._owned(meta["uid"])
        if any(p.template_hash != thash for p in pods):  # strategy Recreate: all old pods go first
            for pod in pods:
                self._remove(pod)
            pods = []
        for pod in sorted(pods, key=lambda p: p.name)[want:]:
            self._remove(pod)
        pods = self._owned(meta["uid"])
        for _ in range(want - len(pods)):
            name = f"{meta['name']}-{thash[:10]}-{uuid.uuid4().hex[:5]}"
            pods.append(self._new_pod(name, d, template, thash))
        for pod in pods:
            if pod.proc is None or (not pod.running and time.monotonic() >= pod.restart_at):
                if pod.proc is not None:
                    pod.restarts += 1  # restartPolicy Always: the same pod, its container again
                self._start(pod)
        ready = sum(p.running and probe_ok(p.container.get("readinessProbe"), p.container, p.ports) for p in pods)
        self._write_status(group("apps/v1", meta["namespace"], "deployments", meta["name"]), {
            "observedGeneration": meta.get("generation", 1), "replicas": len(pods),
            "updatedReplicas": len(pods), "readyReplicas": ready, "availableReplicas": ready,
            "unavailableReplicas": len(pods) - ready})

    def _sync_job(self, j: dict[str, Any]) -> None:
        meta, spec = j["metadata"], j["spec"]
        state = self._jobs.setdefault(meta["uid"], {"succeeded": set(), "failed": 0, "counted": set(),
                                                    "start": None, "conditions": []})
        path = group("batch/v1", meta["namespace"], "jobs", meta["name"])
        if _finished(j):
            return
        if spec.get("suspend"):
            state["start"] = None
            self._write_job(path, state, j, suspended=True)
            return
        state["start"] = state["start"] or now_iso()
        pods = self._owned(meta["uid"])
        for pod in pods:  # count each terminated pod once, as the Job controller does
            if pod.exit_code is not None and pod.name not in state["counted"]:
                state["counted"].add(pod.name)
                if pod.exit_code == 0:
                    state["succeeded"].add(pod.index)
                else:
                    state["failed"] += 1
        completions = spec.get("completions", 1)
        if state["failed"] > spec.get("backoffLimit", 6):
            for pod in pods:
                self._stop_process(pod)
            state["conditions"] = [_condition("FailureTarget", "BackoffLimitExceeded",
                                              "Job has reached the specified backoff limit"),
                                   _condition("Failed", "BackoffLimitExceeded",
                                              "Job has reached the specified backoff limit")]
        elif len(state["succeeded"]) >= completions:
            state["conditions"] = [_condition("SuccessCriteriaMet", "CompletionsReached", "Reached expected number of succeeded pods"),
                                   _condition("Complete", "CompletionsReached", "Reached expected number of succeeded pods")]
            state["completion"] = now_iso()
        else:
            busy = {p.index for p in pods if p.exit_code is None}
            for index in sorted(set(range(completions)) - state["succeeded"] - busy):
                name = f"{meta['name']}-{index}-{uuid.uuid4().hex[:5]}"
                self._start(self._new_pod(name, j, spec["template"], _hash(spec["template"]), index))
            for pod in self._owned(meta["uid"]):
                if pod.proc is None and pod.exit_code is None:
                    self._start(pod)  # was waiting for a Secret or a claim
        self._write_job(path, state, j, suspended=False)

    def _write_job(self, path: str, state: dict[str, Any], j: dict[str, Any], *, suspended: bool) -> None:
        pods = [p for p in self._owned(j["metadata"]["uid"]) if p.exit_code is None]
        status: dict[str, Any] = {
            "active": len(pods), "ready": sum(p.running for p in pods),
            "succeeded": len(state["succeeded"]), "failed": state["failed"],
            "completedIndexes": ",".join(str(i) for i in sorted(state["succeeded"])) or None,
            "startTime": state["start"], "completionTime": state.get("completion"),
            "conditions": state["conditions"] or (
                [_condition("Suspended", "JobSuspended", "Job suspended")] if suspended else None),
        }
        self._write_status(path, status)

    def _write_status(self, path: str, status: dict[str, Any]) -> None:
        if self._written.get(path) != status:
            if self.api.call("PATCH", path + "/status", {"status": status}) is not None:
                self._written[path] = status

    # --- pods ------------------------------------------------------------------------------

    def _new_pod(self, name: str, owner: dict[str, Any], template: dict[str, Any], thash: str,
                 index: Optional[int] = None) -> Pod:
        template = json.loads(json.dumps(template))
        meta = template.setdefault("metadata", {})
        if index is not None:  # what the Job controller adds to an Indexed Job's pods
            meta.setdefault("annotations", {})[COMPLETION_INDEX] = str(index)
            meta.setdefault("labels", {})[COMPLETION_INDEX] = str(index)
            meta["labels"]["batch.kubernetes.io/job-name"] = owner["metadata"]["name"]
            template["spec"].setdefault("hostname", f"{owner['metadata']['name']}-{index}")
        ref = {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": owner["metadata"]["name"],
               "uid": owner["metadata"]["uid"], "controller": True}
        pod = Pod(name=name, namespace=owner["metadata"]["namespace"], owner=ref, template=template,
                  template_hash=thash, dir=self.root / "pods" / name, index=index)
        self.pods[name] = pod
        self.history.append(pod)
        self.api.call("POST", core(pod.namespace, "pods"), {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {**meta, "name": name, "namespace": pod.namespace, "ownerReferences": [ref]},
            "spec": {**template["spec"], "nodeName": "kubelet-local"},
            "status": {"phase": "Pending"}})
        return pod

    def _start(self, pod: Pod) -> None:
        if not pod.ports:  # kept across restarts of the container, as a pod's IP is
            pod.ports = {p["containerPort"]: free_local_port() for p in pod.container.get("ports") or []}
        try:
            mounts = self._materialise_volumes(pod)
            env = self._environment(pod, mounts)
        except NotReady as why:
            pod.waiting = why
            self._pod_status(pod)
            return
        pod.waiting = None
        container = pod.container
        raw = list(container.get("command") or []) + list(container.get("args") or [])
        pod.argv = [map_path(expand(arg, env), mounts) for arg in raw]
        pod.env = env
        workdir = pod.dir / "workdir"
        workdir.mkdir(parents=True, exist_ok=True)
        with open(pod.log, "ab") as log:
            log.write(f"=== {now_iso()} start {pod.argv}\n".encode())
            log.flush()
            pod.proc = subprocess.Popen(pod.argv, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        self._pod_status(pod)

    def _reap(self) -> None:
        for pod in self.pods.values():
            proc = pod.proc
            if proc is None or proc is pod.reaped or proc.poll() is None:
                continue
            pod.reaped = proc
            _signal_group(proc, signal.SIGKILL)  # the container is gone: so is everything it started
            code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
            if pod.index is None and not pod.stopped:  # a Deployment's pod: restarted after a back-off
                base, cap = CRASH_BACKOFF
                pod.last_exit, pod.restart_at = code, time.monotonic() + min(cap, base * 2 ** pod.restarts)
            else:
                pod.exit_code = code
            self._pod_status(pod)

    def _remove(self, pod: Pod) -> None:
        self._stop_process(pod)
        self.pods.pop(pod.name, None)
        self.api.call("DELETE", core(pod.namespace, "pods", pod.name))
        for volume in pod.template["spec"].get("volumes") or []:  # emptyDirs go with the pod
            if "emptyDir" in volume:
                shutil.rmtree(pod.dir / "volumes" / volume["name"], ignore_errors=True)

    def _stop_process(self, pod: Pod, grace: Optional[float] = None) -> None:
        pod.stopped = True
        proc = pod.proc
        if proc is None or proc.poll() is not None:
            return
        grace = pod.template["spec"].get("terminationGracePeriodSeconds", 30) if grace is None else grace
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
        pod.exit_code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode

    def _pod_status(self, pod: Pod) -> None:
        name = pod.container["name"]
        state: dict[str, Any]
        last: dict[str, Any] = {}
        if pod.waiting is not None:
            phase, state = "Pending", {"waiting": {"reason": pod.waiting.reason, "message": pod.waiting.message}}
        elif pod.running:
            phase, state = "Running", {"running": {"startedAt": now_iso()}}
        elif pod.exit_code is None:  # a Deployment's pod between restarts
            terminated = self._terminated(pod, pod.last_exit)
            phase, state, last = "Running", {"waiting": {"reason": "CrashLoopBackOff"}}, {"terminated": terminated}
        else:
            terminated = self._terminated(pod, pod.exit_code)
            phase, state = ("Succeeded" if pod.exit_code == 0 else "Failed"), {"terminated": terminated}
        status = {"phase": phase, "containerStatuses": [{
            "name": name, "ready": pod.running, "restartCount": pod.restarts, "state": state,
            "lastState": last, "image": pod.container.get("image", "")}]}
        self.api.call("PATCH", core(pod.namespace, "pods", pod.name) + "/status", {"status": status})

    @staticmethod
    def _terminated(pod: Pod, code: int) -> dict[str, Any]:
        """A terminated state; a failed container with terminationMessagePolicy FallbackToLogsOnError
        gets its log's last 80 lines, at most 2048 bytes, as its message (as kubelet does)."""
        terminated: dict[str, Any] = {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}
        if code != 0 and pod.container.get("terminationMessagePolicy") == "FallbackToLogsOnError" and pod.log.exists():
            tail = "\n".join(pod.log.read_text(errors="replace").splitlines()[-80:])
            terminated["message"] = tail.encode()[-2048:].decode(errors="ignore")
        return terminated

    # --- volumes and environment -------------------------------------------------------------

    def _materialise_volumes(self, pod: Pod) -> dict[str, str]:
        """mountPath -> local directory, for each volumeMount of the container."""
        volumes = {v["name"]: v for v in pod.template["spec"].get("volumes") or []}
        local: dict[str, Path] = {}
        for name, volume in volumes.items():
            local[name] = self._volume_dir(pod, name, volume)
        mounts = {}
        for mount in pod.container.get("volumeMounts") or []:
            target = local[mount["name"]] / mount.get("subPath", "")
            target.mkdir(parents=True, exist_ok=True)
            mounts[mount["mountPath"].rstrip("/") or "/"] = str(target)
        return mounts

    def _volume_dir(self, pod: Pod, name: str, volume: dict[str, Any]) -> Path:
        ns = pod.namespace
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            if self.api.call("GET", core(ns, "persistentvolumeclaims", claim)) is None:
                raise NotReady("Unschedulable", f'persistentvolumeclaim "{claim}" not found')
            path = self.root / "volumes" / f"pvc-{ns}-{claim}"
        elif "emptyDir" in volume:
            path = pod.dir / "volumes" / name
        elif "configMap" in volume:
            source = volume["configMap"]
            obj = self.api.call("GET", core(ns, "configmaps", source["name"]))
            data = None if obj is None else {**{k: v.encode() for k, v in (obj.get("data") or {}).items()},
                                             **{k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()}}
            path = self._files(pod, name, "configmap", source["name"], source, data)
        elif "secret" in volume:
            source = volume["secret"]
            path = self._files(pod, name, "secret", source["secretName"], source, secret_data(
                self.api.call("GET", core(ns, "secrets", source["secretName"]))))
        else:
            raise NotReady("CreateContainerConfigError", f"volume {name}: this harness knows no {sorted(volume)}")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _files(self, pod: Pod, name: str, kind: str, source_name: str, source: dict[str, Any],
               data: Optional[dict[str, bytes]]) -> Path:
        path = pod.dir / "volumes" / name
        if data is None:
            if source.get("optional"):
                return path
            raise NotReady("ContainerCreating", f'MountVolume.SetUp failed for volume "{name}": {kind} "{source_name}" not found')
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            if item["key"] not in data:
                if source.get("optional"):
                    continue
                raise NotReady("ContainerCreating", f'{kind} "{source_name}" has no key "{item["key"]}"')
            target = path / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data[item["key"]])
        return path

    def _environment(self, pod: Pod, mounts: dict[str, str]) -> dict[str, str]:
        container, ns = pod.container, pod.namespace
        env = dict(IMAGE_ENV)
        env["HOSTNAME"] = pod.template["spec"].get("hostname") or pod.name
        if pod.index is not None:
            env["JOB_COMPLETION_INDEX"] = str(pod.index)
        for source in container.get("envFrom") or []:
            env.update({source.get("prefix", "") + k: v for k, v in self._env_source(ns, source).items()})
        for var in container.get("env") or []:
            value = self._env_value(pod, var, env)
            if value is not None:
                env[var["name"]] = map_port(map_path(value, mounts), pod.ports)
        for alias, local in self.nats_aliases.items():
            env = {k: v.replace(alias, local) for k, v in env.items()}
        env["HOME"] = map_path(env["HOME"], mounts)
        return env

    def _env_source(self, ns: str, source: dict[str, Any]) -> dict[str, str]:
        if "secretRef" in source:
            ref, data = source["secretRef"], secret_data(self.api.call("GET", core(ns, "secrets", source["secretRef"]["name"])))
            data = None if data is None else {k: v.decode() for k, v in data.items()}
        else:
            ref = source["configMapRef"]
            obj = self.api.call("GET", core(ns, "configmaps", ref["name"]))
            data = None if obj is None else dict(obj.get("data") or {})
        if data is None and not ref.get("optional"):
            raise NotReady("CreateContainerConfigError", f'{"secret" if "secretRef" in source else "configmap"} '
                           f'"{ref["name"]}" not found')
        return data or {}

    def _env_value(self, pod: Pod, var: dict[str, Any], env: dict[str, str]) -> Optional[str]:
        if "valueFrom" not in var:
            return expand(var.get("value", ""), env)
        source = var["valueFrom"]
        if "fieldRef" in source:
            return field_value(pod, source["fieldRef"]["fieldPath"])
        if "secretKeyRef" in source:
            ref, kind = source["secretKeyRef"], "secret"
            data = secret_data(self.api.call("GET", core(pod.namespace, "secrets", ref["name"])))
        elif "configMapKeyRef" in source:
            ref, kind = source["configMapKeyRef"], "configmap"
            obj = self.api.call("GET", core(pod.namespace, "configmaps", ref["name"]))
            data = None if obj is None else {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        else:
            raise NotReady("CreateContainerConfigError", f"env {var['name']}: this harness knows no {sorted(source)}")
        if data is None or ref["key"] not in data:
            if ref.get("optional"):
                return None
            missing = f'{kind} "{ref["name"]}" not found' if data is None else \
                f"couldn't find key {ref['key']} in {kind.capitalize()} {pod.namespace}/{ref['name']}"
            raise NotReady("CreateContainerConfigError", missing)
        return data[ref["key"]].decode()


# --- pure helpers -------------------------------------------------------------------------------


def secret_data(obj: Optional[dict[str, Any]]) -> Optional[dict[str, bytes]]:
    """A Secret's keys (`data` base64; `stringData` too, which a real apiserver folds into data)."""
    if obj is None:
        return None
    return {**{k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()},
            **{k: v.encode() for k, v in (obj.get("stringData") or {}).items()}}


def field_value(pod: Pod, path: str) -> str:
    meta = pod.template.get("metadata") or {}
    found = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if found:
        return (meta.get(found.group(1)) or {}).get(found.group(2), "")
    values = {"metadata.name": pod.name, "metadata.namespace": pod.namespace, "metadata.uid": pod.name,
              "spec.nodeName": "kubelet-local", "spec.serviceAccountName": pod.template["spec"].get("serviceAccountName", "default"),
              "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1"}
    if path not in values:
        raise NotReady("CreateContainerConfigError", f"fieldRef {path}: not supported by this harness")
    return values[path]


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables replaced, $$ escapes, others left as written."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


def map_path(value: str, mounts: dict[str, str]) -> str:
    """A container path under a mountPath -> the local directory (whole value, or after `=`)."""
    head, sep, tail = value.rpartition("=") if "=" in value and not value.startswith("/") else ("", "", value)
    for mount in sorted(mounts, key=len, reverse=True):
        if tail == mount or tail.startswith(mount + "/"):
            return head + sep + mounts[mount] + tail[len(mount):]
    return value


def map_port(value: str, ports: dict[int, int]) -> str:
    """A listen address `<host>:<containerPort>` -> `127.0.0.1:<the pod's local port>`."""
    found = re.fullmatch(r"(0\.0\.0\.0|127\.0\.0\.1|localhost|\[::\])?:(\d+)", value)
    if found and int(found.group(2)) in ports:
        return f"127.0.0.1:{ports[int(found.group(2))]}"
    return value


def probe_port(probe: dict[str, Any], container: dict[str, Any], ports: dict[int, int]) -> Optional[int]:
    """The local port of an httpGet probe (its port a number or a container port's name)."""
    port = probe["httpGet"]["port"]
    if isinstance(port, str) and not port.isdigit():
        named = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
        if port not in named:
            return None
        port = named[port]
    return ports.get(int(port))


def probe_ok(probe: Optional[dict[str, Any]], container: dict[str, Any], ports: dict[int, int]) -> bool:
    """A readinessProbe's answer (no probe: ready; a probe this harness cannot call: not ready)."""
    if not probe:
        return True
    if "httpGet" not in probe:
        return False
    port = probe_port(probe, container, ports)
    if port is None:
        return False
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{probe['httpGet'].get('path', '/')}", timeout=1) as r:
            return 200 <= r.status < 400
    except (OSError, urllib.error.HTTPError):
        return False


def free_local_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _hash(template: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()


def _finished(job: dict[str, Any]) -> bool:
    return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
               for c in (job.get("status") or {}).get("conditions") or [])


def _condition(kind: str, reason: str, message: str) -> dict[str, Any]:
    return {"type": kind, "status": "True", "reason": reason, "message": message,
            "lastProbeTime": now_iso(), "lastTransitionTime": now_iso()}


def _signal_group(proc: Optional[subprocess.Popen], sig: int) -> None:
    if proc is None:
        return
    try:
        os.killpg(proc.pid, sig)  # the pod's process group (start_new_session): every process it started
    except (ProcessLookupError, PermissionError):
        pass
