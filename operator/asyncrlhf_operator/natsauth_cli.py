"""`asyncrlhf nats-auth`: the keys of a JWT-mode NATS, as the Secret the chart reads.

    asyncrlhf nats-auth --namespace asyncrlhf -o nats-jwt.yaml   # once; keep the file safe
    kubectl apply -f nats-jwt.yaml
    helm install ... --set nats.auth.mode=jwt --set nats.auth.jwt.existingSecret=asyncrlhf-nats-jwt

The Secret holds the server's trust configuration (`resolver.conf`: operator JWT, system account,
the jobs' account, memory resolver) and the jobs' account signing seed, which only the operator
reads. The operator and account identity seeds are thrown away: the trust chain stays fixed until
the next `nats-auth` (which invalidates every user minted so far). No kopf import.
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

from .natsauth import bootstrap

DEFAULT_NAME = "asyncrlhf-nats-jwt"


def secret_manifest(name: str, namespace: str, operator_name: str = "asyncrlhf") -> dict:
    keys = bootstrap(operator_name)
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"app.kubernetes.io/part-of": "asyncrlhf", "app.kubernetes.io/component": "nats"}},
            "stringData": keys.secret_data()}


def run(args: argparse.Namespace) -> int:
    text = yaml.safe_dump(secret_manifest(args.name, args.namespace), sort_keys=False)
    if args.output in (None, "-"):
        sys.stdout.write(text)
        return 0
    if os.path.exists(args.output):
        print(f"error: {args.output} exists: new keys would lock out every job minted with the old ones; "
              "choose another file (or delete it on purpose)", file=sys.stderr)
        return 2
    fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # a seed: owner-only
    with os.fdopen(fd, "w") as f:
        f.write(text)
    print(f"wrote {args.output} (Secret {args.namespace}/{args.name}; it holds a signing seed: keep it "
          "private)", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("nats-auth", help="make the keys of a JWT-mode NATS (a Secret for the chart's nats.auth.mode jwt)")
    p.add_argument("--name", default=DEFAULT_NAME, help=f"the Secret's name (default {DEFAULT_NAME})")
    p.add_argument("--namespace", default="default", help="the release's namespace (default: default)")
    p.add_argument("-o", "--output", help="file to write, mode 0600 ('-' or none: stdout)")
    p.set_defaults(func=run)
