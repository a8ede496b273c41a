"""The `asyncrlhf` command.

  asyncrlhf run JOB.yaml           run a job on this machine (embedded NATS), report in runs/<job>/
  asyncrlhf compare JOB.yaml       the same job in sync and async mode, side by side
  asyncrlhf validate JOB.yaml      check a manifest and print it with defaults filled in
  asyncrlhf learner|generator      the workload processes (pods run these; `run` starts them)
  asyncrlhf label JOB.yaml [FILE]  publish preference pairs (JSON Lines) to a running job's bus
  asyncrlhf export RUN OUT_DIR     the trained model (newest snapshot) as a Hugging Face directory
  asyncrlhf crd [--write]          the CRD from the spec models (stdout; --write: crds/ and the chart)
  asyncrlhf operator               run the Kubernetes operator
  asyncrlhf nats-auth              the keys of a JWT-mode NATS, as the Secret the chart reads
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from . import __version__
from .manifest import EXIT_BAD_INPUT, ManifestError, dump_manifest, load_manifest
from .workload_env import NATS_URL, SNAPSHOT_DIR, WorkloadEnv, WorkloadEnvError


def _job(path: str):
    try:
        return load_manifest(path)
    except ManifestError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _reward_code_beside(manifest: str) -> None:
    """A python reward module kept next to the job file is importable by the local children."""
    from .reward_kinds import job_dir_on_path

    os.environ["PYTHONPATH"] = job_dir_on_path(manifest, dict(os.environ))["PYTHONPATH"]


def cmd_run(args) -> int:
    from .local import run_job

    job = _job(args.manifest)
    _reward_code_beside(args.manifest)
    if args.mode:
        job.spec.async_.mode = args.mode
    if args.steps:
        job.spec.learner.total_steps = args.steps
    from .local import ResumeError

    from .placement import PlacementError

    run_dir = Path(args.runs_dir) / job.metadata.name
    try:
        if args.dry_run:  # the plan: every process, its devices and environment; nothing starts
            from .local import dry_run

            print("\n".join(dry_run(job, run_dir, gpus=args.gpus)))
            return 0
        result = run_job(job, run_dir, quiet=args.quiet, resume=args.resume, gpus=args.gpus)
    except (ResumeError, PlacementError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from .console import outcome_lines

    print(json.dumps(result.summary, indent=2) if args.json else "\n".join(outcome_lines(result.summary, run_dir)))
    return 0 if result.ok else 1


def cmd_compare(args) -> int:
    from .local import compare

    job = _job(args.manifest)
    _reward_code_beside(args.manifest)
    if args.steps:
        job.spec.learner.total_steps = args.steps
    summary = compare(job, Path(args.runs_dir), quiet=args.quiet)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("sync", "async")}, indent=2))
    print(f"report: {Path(args.runs_dir) / (job.metadata.name + '-compare')}/{{summary.json,reward.png}}")
    return 0


def cmd_validate(args) -> int:
    import yaml

    from .preflight import effective_manifest, problems, resource_warnings

    job = _job(args.manifest)
    errors, here = problems(job, Path(args.manifest))
    if args.local:  # `asyncrlhf run` here would fail on these
        errors, here = errors + here, resource_warnings(job)
    else:
        here = [f"`asyncrlhf run` on this machine would fail: {p}" for p in here]
    for line in [f"warning: {w}" for w in here] + [f"error: {e}" for e in errors]:
        print(line, file=sys.stderr)
    if errors:
        return EXIT_BAD_INPUT
    if args.full:
        print(dump_manifest(job), end="")
    else:
        print(yaml.safe_dump(effective_manifest(job), sort_keys=False), end="")
    print(f"{args.manifest}: valid" + (" for `asyncrlhf run` on this machine" if args.local else ""), file=sys.stderr)
    return 0


def _workload_context(args, read_env):
    """The job, its bus and the process's environment (`WorkloadEnv.for_learner` or
    `for_generator`); a missing variable ends the command with exit code 2."""
    from .bus import JobBus

    job = _job(args.config)
    try:
        env = read_env(os.environ, nats_url=job.spec.nats.url)
    except WorkloadEnvError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    return job, JobBus(job.metadata.namespace, job.metadata.name, uid=env.job_uid), env


def cmd_learner(args) -> int:
    job, bus, env = _workload_context(args, WorkloadEnv.for_learner)  # before torch loads: fail fast
    from .backends import Rendezvous, follower_main, node_process_envs, release_followers, run_node
    from .learner import main_async

    if envs := node_process_envs(os.environ):  # an operator pod with NPROC_PER_NODE > 1 starts its ranks
        return run_node(envs, ["learner", "--config", args.config])
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    if Rendezvous.from_env().rank > 0:  # only rank 0 talks to the bus; the others follow it
        return follower_main(job.spec)
    from .models import ModelNotFoundError
    from .placement import PlacementError
    from .tracking import TrackingError

    from .shutdown import EXIT_STOPPED

    try:
        finished = asyncio.run(main_async(job.spec, bus, env.nats_url, env.snapshot_dir, env.run_dir))
    except (TrackingError, PlacementError, ModelNotFoundError) as err:  # no tracker library / credentials, no GPUs: a restart cannot help
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        release_followers()
    return 0 if finished else EXIT_STOPPED  # stopped before the last step: not a completion


def cmd_generator(args) -> int:
    job, bus, env = _workload_context(args, WorkloadEnv.for_generator)  # before vLLM loads: fail fast
    from .reward_kinds import RewardConfigError, check_functions

    try:
        job.spec.generator.group_named(env.searcher)
        check_functions(job.spec)  # a python reward that cannot be imported: seconds, not after the engine's load
    except (ValueError, RewardConfigError) as err:  # ASYNCRLHF_SEARCHER names a group the spec does not have, ...
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from .bus import BusLimitError
    from .generator import main_async
    from .models import ChatTemplateError, ModelNotFoundError
    from .placement import PlacementError

    try:
        asyncio.run(main_async(job.spec, bus, env.nats_url, env.generator_id, env.snapshot_dir, env.searcher))
    except (RewardConfigError, ChatTemplateError, PlacementError, ModelNotFoundError, BusLimitError) as err:  # a restart cannot help
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def cmd_label(args) -> int:
    from .bus import JobBus
    from .labels import LabelError, publish_preferences, read_preferences

    job = _job(args.manifest)
    url = args.nats_url or os.environ.get(NATS_URL) or job.spec.nats.url
    if not url:
        print(f"error: no NATS URL: pass --nats-url (or set ${NATS_URL}, or spec.nats.url)", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        if args.file in (None, "-"):
            prefs = read_preferences(sys.stdin)
        else:
            with open(args.file) as f:
                prefs = read_preferences(f, args.file)
        bus = JobBus(job.metadata.namespace, job.metadata.name)
        count = asyncio.run(publish_preferences(url, bus, prefs))
    except (LabelError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"published {count} preference pairs to {bus.subject('preferences')}")
    return 0


def cmd_export(args) -> int:
    from .export import ExportError, describe, export

    try:
        out = export(args.source, args.out_dir, version=args.version, tokenizer=args.tokenizer, merge=args.merge,
                     base=args.base)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(describe(out), indent=2))
    from .export import adapter_hint

    print(adapter_hint(out) or f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}) or "
          f"vllm.LLM({str(out)!r})")
    return 0


def cmd_crd(args) -> int:
    """stdout by default; --write rewrites the source checkout's committed copies; -o FILE never
    overwrites a file git tracks without --force."""
    from asyncrlhf_operator import crd

    text, checkout = crd.render(), crd.default_path().parent.is_dir()
    if args.output in (None, "-") and (args.write or args.check) and not checkout:
        print("error: not a source checkout (no crds/ beside the package): pass -o FILE", file=sys.stderr)
        return EXIT_BAD_INPUT
    targets = [Path(args.output)] if args.output not in (None, "-") else \
        [p for p in (crd.default_path(), crd.chart_path()) if p.parent.is_dir()] if args.write or args.check else []
    if args.check:
        stale = [t for t in targets if not t.exists() or t.read_text() != text]
        for t in stale:
            print(f"{t} is out of date: run `asyncrlhf crd --write` and commit the result", file=sys.stderr)
        return 1 if stale else 0
    if not targets:
        sys.stdout.write(text)
        return 0
    if args.output not in (None, "-") and not args.force and _git_tracked(targets[0]):
        print(f"error: {targets[0]} is tracked by git: pass --force to overwrite it (or --write to "
              "regenerate crds/ and the chart's copy)", file=sys.stderr)
        return EXIT_BAD_INPUT
    for target in targets:
        target.write_text(text)
        print(f"wrote {target}", file=sys.stderr)
    return 0


def _git_tracked(path: Path) -> bool:
    import subprocess

    try:
        return subprocess.run(["git", "ls-files", "--error-unmatch", path.name], cwd=path.resolve().parent,
                              capture_output=True).returncode == 0
    except (FileNotFoundError, NotADirectoryError):  # no git, no such directory
        return False


def cmd_render(args) -> int:
    from asyncrlhf_operator import render

    return render.run(args)


def cmd_operator(args) -> int:
    from asyncrlhf_operator.main import run

    run(namespace=args.namespace, all_namespaces=args.all_namespaces, nats_url=args.nats_url,
        health_port=args.health_port, metrics_port=args.metrics_port,
        **{k: v for k in ("status_interval", "resync_interval") if (v := getattr(args, k)) is not None})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asyncrlhf", description="Asynchronous RLHF on Kubernetes and locally.")
    parser.add_argument("--version", action="version", version=f"asyncrlhf {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show every log line on the console, libraries' too (default: our warnings and errors)")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_run_parsers(sub)

    val = sub.add_parser("validate", help="check a manifest offline; print the settings that apply, defaults filled in")
    val.add_argument("manifest", help="the AsyncRLHFJob YAML file")
    val.add_argument("--local", action="store_true", help="also fail when `asyncrlhf run` here would: files, "
                     "reward module, GPUs on this machine (and warn when cores or memory fall short)")
    val.add_argument("--full", action="store_true", help="print every field, those that do not apply too")
    val.set_defaults(func=cmd_validate)

    for role, func in (("learner", cmd_learner), ("generator", cmd_generator)):
        p = sub.add_parser(role, help=f"run the {role} process (env: {NATS_URL}, {SNAPSHOT_DIR})")
        p.add_argument("--config", required=True, help="the job manifest (mounted from the ConfigMap in pods)")
        p.set_defaults(func=func)

    label = sub.add_parser("label", help="publish preference pairs to a running job (one-pass reward head)")
    label.add_argument("manifest", help="the job's manifest (its name and namespace name the bus)")
    label.add_argument("file", nargs="?", help='JSON Lines of {"prompt", "chosen", "rejected"}; - or none: stdin')
    label.add_argument("--nats-url", default="", help=f"the job's NATS (default: ${NATS_URL}, else spec.nats.url)")
    label.set_defaults(func=cmd_label)

    exp = sub.add_parser("export", help="write the trained model as a Hugging Face directory (transformers, vLLM)")
    exp.add_argument("source", help="a run directory (runs/<job>), a volume, or a snapshot directory")
    exp.add_argument("out_dir", help="where to write the model (a new or empty directory)")
    exp.add_argument("--version", type=int, help="the snapshot version (step) to export; default: the newest")
    exp.add_argument("--merge", action="store_true",
                     help="LoRA runs: fold the adapter into the base model's weights (default: export the adapter)")
    exp.add_argument("--base", default="", help="LoRA --merge: the base model (default: the job's model.policy)")
    exp.add_argument("--tokenizer", default="", help="tokenizer path or hub id, for a snapshot without one")
    exp.set_defaults(func=cmd_export)

    from asyncrlhf_operator import crd as crd_tool  # no kopf: the CRD generator and its options

    crd = sub.add_parser("crd", help="print the CRD generated from the spec models (--write: update crds/)")
    crd_tool.add_arguments(crd).set_defaults(func=cmd_crd)
    crd.add_argument("--write", action="store_true", help="rewrite the source checkout's crds/ and the chart's copy")
    crd.add_argument("--force", action="store_true", help="let -o overwrite a file that git tracks")
    _help(crd, "-o", "file to write ('-' or none: stdout)")
    _help(crd, "--check", "exit 1 when -o FILE (default: crds/ and the chart's copy) differs from a fresh generation")
    from asyncrlhf_operator import render as render_tool  # no kopf: plan functions only

    render = sub.add_parser("render", help="print every Kubernetes object the operator would apply for a job")
    render_tool.add_arguments(render).set_defaults(func=cmd_render)
    from asyncrlhf_operator import natsauth_cli  # no kopf: keys and tokens only
    natsauth_cli.add_parser(sub)
    _add_operator_parser(sub)
    return parser


def _add_run_parsers(sub) -> None:
    run = sub.add_parser("run", help="run a job on this machine")
    run.add_argument("manifest", help="the AsyncRLHFJob YAML file")
    run.add_argument("--mode", choices=["async", "sync"], help="override spec.async.mode")
    run.add_argument("--steps", type=int, help="override spec.learner.totalSteps")
    run.add_argument("--runs-dir", default="runs", help="where reports go (default: runs/)")
    run.add_argument("-q", "--quiet", action="store_true",
                     help="no start-up phases or live progress; only the outcome")
    run.add_argument("--json", action="store_true", help="end with summary.json's content instead of a short outcome")
    run.add_argument("--resume", action="store_true",
                     help="continue runs/<job>/ from its last checkpoint (e.g. after Ctrl-C, or with more "
                     "--steps); without it an earlier run is moved aside to runs/<job>-<time>/")
    run.add_argument("--dry-run", action="store_true",
                     help="print every process that would start, with its GPUs, devices and environment "
                     "(secrets masked), and start nothing")
    run.add_argument("--gpus", type=int, metavar="N",
                     help="plan as if this machine had N GPUs (default: those CUDA_VISIBLE_DEVICES / torch see)")
    run.set_defaults(func=cmd_run)

    comp = sub.add_parser("compare", help="run a job in sync and async mode and compare")
    comp.add_argument("manifest", help="the AsyncRLHFJob YAML file")
    comp.add_argument("--steps", type=int, help="override spec.learner.totalSteps")
    comp.add_argument("--runs-dir", default="runs", help="where reports go (default: runs/<job>-sync, -async, -compare)")
    comp.add_argument("-q", "--quiet", action="store_true", help="no live progress")
    comp.set_defaults(func=cmd_compare)


def _add_operator_parser(sub) -> None:
    # The defaults shown are the operator's own (its settings module loads no kopf).
    from asyncrlhf_operator.settings import DEFAULT_NATS_URL, OperatorConfig

    op = sub.add_parser("operator", help="run the Kubernetes operator")
    scope = op.add_mutually_exclusive_group()
    scope.add_argument("--namespace", help="watch one namespace")
    scope.add_argument("--all-namespaces", action="store_true", help="watch every namespace")
    op.add_argument("--nats-url", default="", help="NATS URL of jobs whose spec.nats.url is empty "
                    f"(default: ${NATS_URL}, else {DEFAULT_NATS_URL})")
    op.add_argument("--health-port", type=int, default=8080, help="liveness probe at :PORT/healthz (0: off; default 8080)")
    op.add_argument("--metrics-port", type=int, default=9090, help="Prometheus metrics at :PORT/metrics (0: off; default 9090)")
    op.add_argument("--status-interval", type=float,
                    help=f"seconds between status passes per job (default {OperatorConfig.status_interval:g})")
    op.add_argument("--resync-interval", type=float, help="seconds between re-applying every child, to undo "
                    f"hand edits (default {OperatorConfig.resync_interval:g})")
    op.set_defaults(func=cmd_operator)


def _help(parser: argparse.ArgumentParser, option: str, text: str) -> None:
    """Replace the help of an option added by another module's add_arguments."""
    parser._option_string_actions[option].help = text


def main(argv: list[str] | None = None) -> int:
    from .logs import console_logging, workload_logging

    args = build_parser().parse_args(argv)
    if args.command in ("learner", "generator", "operator"):  # a log file or pod log: everything, repeats collapsed
        workload_logging(args.verbose)
    else:  # a person's console: our warnings and errors; -v everything
        console_logging(args.verbose)
    if args.command in ("learner", "generator", "run", "compare"):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-file progress bars flood the logs of long runs
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
