"""The operator at scale against kmock (issue 12): N AsyncRLHFJobs, a real operator process.

`asyncrlhf operator --all-namespaces` (the chart's entry point: kopf.operator with the
operator's default intervals, status every 5 s and resync every 60 s) runs as a subprocess
against kmock (tests/kmock_support.py, the emulator the operator tests use, served here from a
thread) with a real nats-server for the jobs' streams. Every job is examples/local-tiny.yaml's
spec under its own name (it names the `nats-credentials` Secret, created here: the chart's case).

  (a) apply → all children created, per job: the N jobs are POSTed at once (as `kubectl apply -f
      DIR` would), and each job's time is from kmock serving its POST to kmock serving the
      creation of the last of its 7 children (ServiceAccount, ConfigMap, PVC, Service,
      NetworkPolicy, learner Job, generator Deployment; the stream is made before them), read
      from kmock's own request log: nothing polls. p50 / p95 / max over the N jobs.
  (b) API requests per job per minute at rest: every request kmock serves to the operator (kopf's
      and the operator's own client, told apart by User-Agent; the bench's own requests are left
      out) over a fixed window, divided by jobs and minutes, by verb and resource. Two states:
      "pending" (children exist, no controller has made them ready: what kmock gives by itself)
      and "running" (the bench then writes the learner Job's and the Deployment's status as the
      Job and Deployment controllers would: the learner active and ready, generators ready; the
      state a healthy job stays in for hours). The goal is for "running".

    python bench/operator_bench.py                      # 100 jobs, 60 s windows; writes bench/results/operator.{md,json}
    python bench/operator_bench.py --jobs N --window S [--out DIR]
    python bench/operator_bench.py --quick              # 5 jobs, 10 s windows; prints only (unless --out)

Goals (issue 12): ≤ 2 requests per job per minute at rest, p95 ≤ 2 s apply → all children.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "workloads"), str(REPO / "operator"), str(REPO / "tests")]

import kmock  # noqa: E402

from asyncrlhf import api  # noqa: E402
from asyncrlhf.bus import EmbeddedNats  # noqa: E402
from asyncrlhf_operator.settings import OperatorConfig  # noqa: E402
from kmock_support import CHILDREN, CR, NS, ApiThread, Emulator, write_kubeconfig  # noqa: E402

GOAL_RATE = 2.0  # requests per job per minute at rest
GOAL_P95 = 2.0  # seconds, apply → all children
EXAMPLE = REPO / "examples" / "local-tiny.yaml"
SECRET = "nats-credentials"  # what local-tiny.yaml's spec.nats.credentialsSecret names
BENCH_AGENT = "operator-bench"
STREAM_BYTES = 64 << 20  # spec.nats.maxBytes of every job (see job_manifest)
# (plural, name pattern) of each child, from the tests' table of child paths
CHILD_KEYS = {kind: (path.split("/")[-2], path.split("/")[-1]) for kind, path in CHILDREN.items()}

# What makes each request, for the report (read from operator/asyncrlhf_operator/ at the commit
# measured); keys are (client, verb, resource).
SOURCES = {
    ("asyncrlhf-operator", "get", "secrets"):
        "status pass: `children.bus_access` → `jetstream.read_credentials` GETs spec.nats.credentialsSecret "
        "every pass (and again at each resync's `apply_all`)",
    ("asyncrlhf-operator", "get", "jobs"):
        "status pass: `handlers.observe_children` GETs the learner Job every pass; at each resync "
        "`children.reconcile_learner` GETs it again",
    ("asyncrlhf-operator", "get", "deployments"):
        "status pass: `handlers.observe_children` GETs the generator Deployment every pass",
    ("asyncrlhf-operator", "list", "pods"):
        "status pass: `handlers.observe_children` lists the job's pods whenever not all are ready "
        "(to say why): every pass of a Pending job",
    ("asyncrlhf-operator", "get", "persistentvolumeclaims"):
        "resync: `children.reconcile_volume` GETs the PVC (its spec is immutable, so it is not applied)",
    ("asyncrlhf-operator", "patch (apply)", "serviceaccounts"): "resync: `children.apply_all` server-side applies it",
    ("asyncrlhf-operator", "patch (apply)", "configmaps"): "resync: `children.apply_all` server-side applies it",
    ("asyncrlhf-operator", "patch (apply)", "services"): "resync: `children.apply_all` server-side applies it",
    ("asyncrlhf-operator", "patch (apply)", "networkpolicies"): "resync: `children.apply_all` server-side applies it",
    ("asyncrlhf-operator", "patch (apply)", "deployments"): "resync: `children.apply_all` server-side applies it",
    ("asyncrlhf-operator", "patch (apply)", "jobs"): "resync: `children.reconcile_learner` applies the learner Job",
    ("kopf", "patch (merge)", "asyncrlhfjobs/status"):
        "status pass: kopf writes the handler's `patch.status` (`status.status_patch`: only what changed)",
    ("kopf", "patch (merge)", "asyncrlhfjobs"):
        "kopf: handler progress / last-handled annotations, finalizer",
    ("kopf", "create", "events"): "kopf.info / kopf.warn: an Event per phase change or problem",
    ("kopf", "watch", "asyncrlhfjobs"): "kopf's watch of the jobs (one long request; re-opened after its timeout)",
}


class CountingEmulator(Emulator):
    """The tests' emulator, logging every request it serves as it arrives: [arrival time
    (monotonic), client, verb, resource[/subresource], name, HTTP status, time answered]. A watch
    is logged when it opens (it is answered only when it ends)."""

    log: list[list[Any]]

    async def _handle(self, request):
        if not hasattr(self, "log"):
            self.log = []
        data = request.data
        name = request.name or (data.get("metadata", {}).get("name", "") if isinstance(data, dict) else "")
        entry = [time.monotonic(), client_of(request.headers), verb_of(request), resource_of(request), name, 0, None]
        self.log.append(entry)
        status = 500
        try:
            response = await super()._handle(request)
            status = getattr(response, "status", 200)
            return response
        except kmock.KubernetesError as err:
            status = getattr(err, "status", None) or 500
            raise
        finally:
            entry[5], entry[6] = int(status), time.monotonic()
            # kmock keeps every request it served and, to route each new one, tests it for
            # membership in that whole history (filters applied to every past request): the
            # cost of a request grows with the requests before it, and 100 jobs
            # (thousands of requests a minute) made kmock, not the operator, the bottleneck
            # (a POST timed out). The bench keeps its own log above, so kmock forgets a request
            # once answered (a watch stays listed while it streams).
            try:
                self._requests.remove(request)
            except ValueError:
                pass


def client_of(headers) -> str:
    agent = headers.get("User-Agent", "") or ""
    if agent.startswith(BENCH_AGENT) or agent.startswith("Python-urllib"):
        return "bench"
    if agent.startswith("kopf"):
        return "kopf"
    if agent.startswith("asyncrlhf-operator"):
        return "asyncrlhf-operator"
    return agent or "?"


def verb_of(request) -> str:
    action = request.action
    if action is None:
        return f"{request.method.value if hasattr(request.method, 'value') else request.method} (discovery)".lower()
    verb = {kmock.action.LIST: "list", kmock.action.WATCH: "watch", kmock.action.FETCH: "get",
            kmock.action.CREATE: "create", kmock.action.UPDATE: "patch", kmock.action.DELETE: "delete"}[action]
    if verb == "patch":
        content = request.headers.get("Content-Type", "")
        kind = "apply" if "apply-patch" in content else "json" if "json-patch" in content else \
            "merge" if "merge-patch" in content else "other"
        verb = f"patch ({kind})"
    return verb


def resource_of(request) -> str:
    if request.resource is None:
        return "(discovery)"
    plural = request.resource.plural
    return f"{plural}/{request.subresource}" if request.subresource else plural


# ---------------------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine()}


def job_manifest(name: str) -> dict[str, Any]:
    spec = yaml.safe_load(EXAMPLE.read_text())["spec"]
    # JetStream reserves each stream's maxBytes (default 1 GiB) against its store: the first run
    # of 100 jobs here got streams, and so children, for 56 jobs only (75 GB free disk × 0.75)
    spec.setdefault("nats", {})["maxBytes"] = STREAM_BYTES
    return {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name, "namespace": NS}, "spec": spec}


def operator_command(nats_url: str, status_interval: float, resync_interval: float) -> list[str]:
    script = Path(sys.executable).with_name("asyncrlhf")
    base = [str(script)] if script.exists() else [sys.executable, "-c", "import sys; from asyncrlhf.cli import main; sys.exit(main())"]
    return base + ["operator", "--all-namespaces", "--nats-url", nats_url, "--health-port", "0",
                   "--metrics-port", "0", "--status-interval", f"{status_interval:g}",
                   "--resync-interval", f"{resync_interval:g}"]


class Bench:
    def __init__(self, kube: ApiThread, jobs: int, status_interval: float) -> None:
        self.kube, self.n, self.status_interval = kube, jobs, status_interval
        self.names = [f"bench-{i:03d}" for i in range(jobs)]

    @property
    def log(self) -> list[list[Any]]:
        return list(getattr(self.kube.emulator, "log", []))

    def wait(self, check, timeout: float, what: str, operator: subprocess.Popen) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            if operator.poll() is not None:
                raise RuntimeError(f"the operator exited with {operator.returncode} while waiting for {what}")
            result = check()
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.2)

    def operator_watching(self) -> bool:
        return any(e[1] == "kopf" and e[2] == "watch" and e[3] == api.PLURAL for e in self.log)

    def apply_all(self) -> None:
        for name in self.names:
            self.kube.call("POST", CR, job_manifest(name))

    def creation_latencies(self) -> Optional[dict[str, float]]:
        """Per job: seconds from kmock serving its POST to serving the last child's creation;
        None while some child is missing."""
        created: dict[tuple[str, str], float] = {}
        for _arrived, _client, verb, resource, name, status, answered in self.log:
            if verb == "create" and 0 < status < 300:
                created.setdefault((resource, name), answered)
        latencies = {}
        for job in self.names:
            applied = created.get((api.PLURAL, job))
            children = [created.get((plural, pattern.format(job))) for plural, pattern in CHILD_KEYS.values()]
            if applied is None or None in children:
                return None
            latencies[job] = max(children) - applied
        return latencies

    def missing(self) -> str:
        """For a timeout's message: which children do not exist yet."""
        created = {(e[3], e[4]) for e in self.log if e[2] == "create" and 0 < e[5] < 300}
        gone = Counter(kind for job in self.names for kind, (plural, pattern) in CHILD_KEYS.items()
                       if (plural, pattern.format(job)) not in created)
        jobs = sum(1 for job in self.names if any((p, n.format(job)) not in created for p, n in CHILD_KEYS.values()))
        errors = Counter((e[1], e[2], e[3], e[5]) for e in self.log if e[5] >= 400)
        return f"{jobs} jobs incomplete; missing {dict(gone)}; errors served {dict(errors)}"

    def jobs_in(self, phase: str) -> bool:
        found = self.kube.get(CR) or {"items": []}
        items = {i["metadata"]["name"]: i for i in found["items"]}
        return all(((items.get(n) or {}).get("status") or {}).get("phase") == phase for n in self.names)

    def mark_running(self) -> None:
        """What the Job and Deployment controllers (and kubelet) would write for a healthy job."""
        spec = job_manifest("x")["spec"]
        nodes = (spec.get("learner") or {}).get("nodes", 1)
        replicas = (spec.get("generator") or {}).get("replicas", 1)
        for job in self.names:
            self.kube.call("PATCH", CHILDREN["Job"].format(job) + "/status",
                           {"status": {"active": nodes, "ready": nodes, "startTime": "2026-01-01T00:00:00Z"}})
            self.kube.call("PATCH", CHILDREN["Deployment"].format(job) + "/status",
                           {"status": {"replicas": replicas, "readyReplicas": replicas,
                                       "availableReplicas": replicas, "updatedReplicas": replicas,
                                       "observedGeneration": 1}})

    def window(self, seconds: float) -> dict[str, Any]:
        start = time.monotonic()
        time.sleep(seconds)
        end = time.monotonic()
        served = [e for e in self.log if start <= e[0] < end and e[1] != "bench"]
        per = 60.0 / (seconds * self.n)
        counts = Counter((e[1], e[2], e[3]) for e in served)
        errors = Counter((e[2], e[3], e[5]) for e in served if e[5] >= 400)
        rows = [{"client": c, "verb": v, "resource": r, "requests": k, "per_job_per_minute": round(k * per, 3),
                 "source": SOURCES.get((c, v, r), "")}
                for (c, v, r), k in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
        return {"seconds": round(end - start, 2), "requests": len(served),
                "per_job_per_minute": round(len(served) * per, 3), "breakdown": rows,
                "errors": [{"verb": v, "resource": r, "status": s, "requests": k} for (v, r, s), k in errors.items()]}


def run(jobs: int, window: float, status_interval: float, resync_interval: float, workdir: Path,
        progress=print) -> dict[str, Any]:
    load_before = os.getloadavg()
    with EmbeddedNats() as bus, ApiThread(CountingEmulator) as kube:
        kubeconfig = workdir / "kubeconfig"
        write_kubeconfig(kubeconfig, kube.url)
        kube.call("POST", f"/api/v1/namespaces/{NS}/secrets", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET, "namespace": NS},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in {"user": "bench", "password": "bench"}.items()}})
        env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
        env.update(KUBECONFIG=str(kubeconfig), PYTHONPATH=os.pathsep.join(
            [str(REPO / "workloads"), str(REPO / "operator"), env.get("PYTHONPATH", "")]))
        log_path = workdir / "operator.log"
        with open(log_path, "wb") as log_file:
            operator = subprocess.Popen(operator_command(bus.url, status_interval, resync_interval),
                                        stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=workdir)
        try:
            bench = Bench(kube, jobs, status_interval)
            bench.wait(bench.operator_watching, 120, "the operator to watch the jobs", operator)
            time.sleep(1.0)
            progress(f"operator up; applying {jobs} jobs")
            t0 = time.monotonic()
            bench.apply_all()
            applied_in = time.monotonic() - t0
            try:
                latencies = bench.wait(bench.creation_latencies, 120 + 3 * jobs, "every job's children", operator)
            except TimeoutError:
                progress(bench.missing())
                progress("operator log, last lines:\n" + "\n".join(log_path.read_text(errors="replace").splitlines()[-30:]))
                raise
            all_in = time.monotonic() - t0
            progress(f"all children of {jobs} jobs in {all_in:.1f} s; waiting for Pending")
            bench.wait(lambda: bench.jobs_in("Pending"), 60 + jobs, "every job Pending", operator)
            time.sleep(status_interval + 1)
            progress(f"pending: counting requests for {window:g} s")
            pending = bench.window(window)
            bench.mark_running()
            bench.wait(lambda: bench.jobs_in("Running"), 60 + jobs, "every job Running", operator)
            time.sleep(status_interval + 1)
            progress(f"running: counting requests for {window:g} s")
            running = bench.window(window)
        finally:
            progress("stopping the operator")
            operator.terminate()
            try:
                operator.wait(20)
            except subprocess.TimeoutExpired:
                operator.kill()
                operator.wait()
        progress(f"operator stopped (exit {operator.returncode})")
        tail = log_path.read_text(errors="replace").splitlines()
        errors = [line for line in tail if " ERROR " in line or "Traceback" in line]
    values = list(latencies.values())
    return {
        "jobs": jobs, "window_s": window, "status_interval_s": status_interval, "resync_interval_s": resync_interval,
        "apply_to_children_s": {"p50": round(percentile(values, 50), 3), "p95": round(percentile(values, 95), 3),
                                "max": round(max(values), 3), "mean": round(statistics.fmean(values), 3),
                                "per_job": {k: round(v, 3) for k, v in latencies.items()}},
        "posting_all_jobs_s": round(applied_in, 3), "all_children_of_all_jobs_s": round(all_in, 3),
        "at_rest": {"pending": pending, "running": running},
        "operator_log_errors": errors[:20], "operator_exit": operator.returncode,
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


# ---------------------------------------------------------------------------------------------


def render(result: dict[str, Any], command: str, meta: dict[str, Any]) -> str:
    lat, rest = result["apply_to_children_s"], result["at_rest"]
    running, pending = rest["running"], rest["pending"]
    ok = lambda met: "met" if met else "**missed**"  # noqa: E731
    lines = [
        "# The operator at scale against kmock (bench/operator_bench.py)", "",
        f"Command: `{command}` — commit {meta['commit']}{meta['dirty']}, {meta['date']}; "
        f"machine: {meta['machine']['cpus']} CPUs ({meta['machine']['processor']}), {meta['machine']['platform']}, "
        f"Python {meta['machine']['python']}; load average {result['loadavg_before'][0]} before, "
        f"{result['loadavg_after'][0]} after (shared machine).", "",
        f"{result['jobs']} AsyncRLHFJobs (examples/local-tiny.yaml's spec, each its own name, naming the "
        f"`{SECRET}` Secret; `nats.maxBytes` {STREAM_BYTES >> 20} MiB, since JetStream reserves each stream's "
        "1 GiB default against its store) against kmock, the operator a real `asyncrlhf operator --all-namespaces` process "
        f"(kopf) with its default intervals (status every {result['status_interval_s']:g} s, resync every "
        f"{result['resync_interval_s']:g} s) and a real nats-server. Requests counted by kmock as it served "
        f"them, over a {result['window_s']:g} s window per state; the bench's own requests left out.", "",
        "| measure | value | goal | |", "|---|---:|---:|---|",
        f"| apply → all 7 children, p50 | {lat['p50']:.2f} s | | |",
        f"| apply → all 7 children, p95 | {lat['p95']:.2f} s | ≤ {GOAL_P95:g} s | {ok(lat['p95'] <= GOAL_P95)} |",
        f"| apply → all 7 children, max | {lat['max']:.2f} s | | |",
        f"| API requests per job per minute at rest, running (learner and generators ready) | "
        f"{running['per_job_per_minute']:.2f} | ≤ {GOAL_RATE:g} | {ok(running['per_job_per_minute'] <= GOAL_RATE)} |",
        f"| API requests per job per minute, pending (children made, not ready: no controllers in kmock) | "
        f"{pending['per_job_per_minute']:.2f} | | |", "",
        f"All {result['jobs']} jobs were POSTed in {result['posting_all_jobs_s']:.2f} s (at once, as `kubectl "
        f"apply -f DIR`); the last job's last child existed {result['all_children_of_all_jobs_s']:.1f} s after "
        "the first POST.", "",
    ]
    for title, w in (("running (at rest)", running), ("pending", pending)):
        lines += [f"## Requests by client, verb and resource: {title}", "",
                  f"{w['requests']} requests in {w['seconds']:g} s for {result['jobs']} jobs.", "",
                  "| client | verb | resource | requests | per job per minute | made by |", "|---|---|---|---:|---:|---|"]
        lines += [f"| {r['client']} | {r['verb']} | {r['resource']} | {r['requests']} | {r['per_job_per_minute']:.2f} "
                  f"| {r['source']} |" for r in w["breakdown"]]
        if w["errors"]:
            lines += ["", "Answered with an error: " + ", ".join(
                f"{e['verb']} {e['resource']} → {e['status']} ×{e['requests']}" for e in w["errors"])]
        lines.append("")
    if result["operator_log_errors"]:
        lines += ["Errors in the operator's log:", "", "```", *result["operator_log_errors"], "```", ""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, help="number of AsyncRLHFJobs (default 100; --quick: 5)")
    parser.add_argument("--window", type=float, help="seconds requests are counted per state (default 60; --quick: 10)")
    parser.add_argument("--quick", action="store_true", help="5 jobs, 10 s windows; writes nothing unless --out")
    parser.add_argument("--status-interval", type=float, default=OperatorConfig.status_interval,
                        help="the operator's --status-interval (default: its own, %(default)g)")
    parser.add_argument("--resync-interval", type=float, default=OperatorConfig.resync_interval,
                        help="the operator's --resync-interval (default: its own, %(default)g)")
    parser.add_argument("--out", help="directory for operator.md and operator.json (default bench/results; "
                        "--quick: none)")
    args = parser.parse_args(argv)
    jobs = args.jobs or (5 if args.quick else 100)
    window = args.window or (10.0 if args.quick else 60.0)
    out = Path(args.out) if args.out else (None if args.quick else REPO / "bench" / "results")
    command = "python bench/operator_bench.py" + ("".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])))
    with tempfile.TemporaryDirectory(prefix="operator-bench-") as tmp:
        started = time.monotonic()
        result = run(jobs, window, args.status_interval, args.resync_interval, Path(tmp),
                     progress=lambda m: print(f"[{time.monotonic() - started:6.1f} s] {m}", file=sys.stderr, flush=True))
    meta = {"commit": git("rev-parse", "--short", "HEAD"),
            "dirty": " (uncommitted changes in operator/)" if git("status", "--porcelain", "--", "operator") else "",
            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine()}
    report = render(result, command, meta)
    print(report)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "operator.json").write_text(json.dumps({"command": command, **meta, **result}, indent=1) + "\n")
        (out / "operator.md").write_text(report)
        print(f"written: {out / 'operator.md'}, {out / 'operator.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
