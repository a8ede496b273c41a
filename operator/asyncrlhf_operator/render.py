"""`asyncrlhf render JOB.yaml`: every Kubernetes object the operator would apply for a job.

The same `plan.desired_children` the operator runs, printed as YAML for review, diffs and
GitOps. Two things differ from what lands on a cluster: the owner's uid is only known once the
job exists (`--owner-uid` to include ownerReferences, else they are left out), and the JetStream
stream, consumers and KV bucket the operator makes over NATS are named in a comment, not objects.
A job with a Kueue queue name gets its Workload too, and its workloads as they are before Kueue
admits it (learner suspended, no generators).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional

import yaml

from asyncrlhf.bus import JobBus
from asyncrlhf.manifest import EXIT_BAD_INPUT, ManifestError, load_manifest

from . import plan
from .settings import default_nats_url


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("manifest", help="the AsyncRLHFJob manifest")
    parser.add_argument("-n", "--namespace", help="namespace of the job (default: its metadata.namespace)")
    parser.add_argument("--nats-url", default="", help="the operator's default NATS URL (default: "
                        "$ASYNCRLHF_NATS_URL, else the chart's NATS Service)")
    parser.add_argument("--owner-uid", default="", help="uid of the existing job: adds the ownerReferences")
    return parser


def rendered(manifest: str, namespace: Optional[str] = None, nats_url: str = "", owner_uid: str = "") -> str:
    """The YAML stream of the job's children (raises ManifestError for a bad manifest)."""
    job = load_manifest(manifest)
    if namespace:
        job = job.model_copy(update={"metadata": job.metadata.model_copy(update={"namespace": namespace})})
    owner = plan.Owner(name=job.metadata.name, namespace=job.metadata.namespace, uid=owner_uid)
    url = default_nats_url(nats_url)
    children = plan.desired_children(job, owner, url, admission=plan.gate(job, None))
    if plan.queue_name(job):
        children.append(plan.queued_workload(job, owner, url))
    if not owner_uid:
        children = [_without_owner(child) for child in children]
    bus = JobBus(owner.namespace, owner.name)
    header = (f"# {len(children)} objects for AsyncRLHFJob {owner.namespace}/{owner.name}, rendered by "
              f"`asyncrlhf render`; the operator also makes JetStream stream {bus.stream} (with its "
              f"consumers) and KV bucket {bus.bucket}.\n")
    return header + yaml.safe_dump_all(children, sort_keys=False)


def _without_owner(child: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in child["metadata"].items() if k != "ownerReferences"}
    return {**child, "metadata": meta}


def run(args: argparse.Namespace) -> int:
    try:
        text = rendered(args.manifest, args.namespace, args.nats_url, args.owner_uid)
    except ManifestError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    sys.stdout.write(text)
    return 0
