"""`erw pipeline compile|submit|schedule|run-local|params`.

The command area of the top-level `pipeline` package (Kubeflow Pipelines). `erw.cli` registers it by
name like every other area; nothing in `erw` imports it, so the library knows nothing about KFP.
"""

from __future__ import annotations

import argparse
import json

ARGUMENTS_HELP = (
    "pipeline arguments NAME=VALUE (YAML values: image=REGISTRY/erw:TAG train_nodes=8 'overrides=[train.lr=2e-4]' "
    "launch.max_restarts=1)"
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="the Kubeflow pipeline: compile, submit, schedule, or run it locally")
    cmds = p.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")

    c = cmds.add_parser("compile", help="write pipeline.yaml (KFP IR: pipeline spec + Kubernetes platform spec)")
    c.add_argument(
        "--out",
        default=None,
        help="output file (default: pipeline.yaml at the root of this checkout; installed: in the working directory)",
    )
    c.set_defaults(func=_compile)

    s = cmds.add_parser("submit", help="start one run on a KFP server")
    _server_flags(s)
    s.add_argument("--run-name", default="", help="display name of the run")
    s.add_argument("--no-cache", action="store_true", help="execute every step, even those with cached results")
    s.add_argument("arguments", nargs="*", metavar="NAME=VALUE", help=ARGUMENTS_HELP)
    s.set_defaults(func=_submit)

    r = cmds.add_parser("schedule", help="create a recurring run (retraining as new data lands)")
    _server_flags(r)
    r.add_argument(
        "--cron", required=True, help="6-field cron in UTC, seconds first: '0 0 3 * * 0' = Sundays 03:00 UTC"
    )
    r.add_argument("--job-name", default="erw-retrain", help="name of the recurring run")
    r.add_argument("--max-concurrency", type=int, default=1, help="runs allowed at once (default 1: never overlap)")
    r.add_argument("--catchup", action="store_true", help="also start the runs missed while paused")
    r.add_argument("arguments", nargs="*", metavar="NAME=VALUE", help=ARGUMENTS_HELP)
    r.set_defaults(func=_schedule)

    lr = cmds.add_parser(
        "run-local",
        help="run the whole DAG on this machine (kfp.local + TorchX local_cwd)",
        description="Run every step as a local subprocess and the training steps as local torchrun jobs. "
        "Defaults: the digits demo (created on first use), 2 processes, outputs under runs/demo/pipeline; "
        "pass workspace=s3://BUCKET/prefix with AWS_ENDPOINT_URL set to write to a local S3 endpoint.",
    )
    lr.add_argument("--config", default=None, help="config preset (default configs/demo.yaml)")
    lr.add_argument(
        "--image",
        default=None,
        help="run every step as a container of this image (kfp.local's DockerRunner; Docker, or podman's "
        "socket in DOCKER_HOST), as uid 1000 on a read-only root, local folders mounted at their paths",
    )
    lr.add_argument("--no-cache", action="store_true", help="execute every step, even those with cached results")
    lr.add_argument(
        "--verbose",
        action="store_true",
        help="also show the steps' full output (kfp.local's executor dumps, artifact listings), "
        "which otherwise goes only to the log file whose path is printed",
    )
    lr.add_argument("arguments", nargs="*", metavar="NAME=VALUE", help=ARGUMENTS_HELP)
    lr.set_defaults(func=_run_local)

    pp = cmds.add_parser("params", help="list the pipeline parameters with their defaults (and the demo's)")
    pp.set_defaults(func=_params)


def _server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="", help="KFP API endpoint (default: $KF_PIPELINES_ENDPOINT or in-cluster)")
    p.add_argument("--namespace", default="", help="profile namespace (multi-user Kubeflow)")
    p.add_argument("--experiment", default="erw", help="experiment to file the run under")
    p.add_argument(
        "--skip-version-check",
        action="store_true",
        help="do not ask the server for its KFP release (needed: >= 2.15; for dev builds that report none)",
    )
    p.add_argument(
        "--service-account",
        default="",
        help="service account of the run's pods (default: KFP's); it must hold the erw-launcher Role (k8s/base)",
    )


def _arguments(args: argparse.Namespace) -> dict:
    from pipeline.params import parse_cli_arguments

    return parse_cli_arguments(args.arguments)


def _compile(args: argparse.Namespace) -> int:
    from pipeline.compile import compile_pipeline

    print(f"wrote {compile_pipeline(args.out)}")
    return 0


def _submit(args: argparse.Namespace) -> int:
    from pipeline.params import resolve
    from pipeline.submit import connect, submit

    arguments = _arguments(args)
    resolve(arguments)  # fail before connecting
    result = submit(
        connect(args.host, not args.skip_version_check),
        arguments,
        args.experiment,
        args.run_name,
        args.service_account,
        args.namespace,
        enable_caching=False if args.no_cache else None,
    )
    print(f"submitted run {result.run_id}")
    return 0


def _schedule(args: argparse.Namespace) -> int:
    from pipeline.params import resolve
    from pipeline.submit import check_cron, connect, schedule

    arguments = _arguments(args)
    check_cron(args.cron)
    resolve(arguments)  # fail before connecting
    job = schedule(
        connect(args.host, not args.skip_version_check),
        arguments,
        args.cron,
        args.job_name,
        args.experiment,
        args.service_account,
        args.namespace,
        args.max_concurrency,
        args.catchup,
    )
    print(f"created recurring run {job.recurring_run_id} ({args.cron})")
    return 0


def _run_local(args: argparse.Namespace) -> int:
    from pipeline.local import run_local

    arguments = _arguments(args)
    if args.config:
        arguments["config"] = args.config
    print(run_local(arguments, use_cache=not args.no_cache, verbose=args.verbose, image=args.image).summary())
    return 0


def _params(args: argparse.Namespace) -> int:
    from pipeline.params import DEMO, defaults

    for name, value in defaults().items():
        demo = f"   (demo: {json.dumps(DEMO[name])})" if name in DEMO and DEMO[name] != value else ""
        print(f"{name} = {json.dumps(value)}{demo}")
    return 0
