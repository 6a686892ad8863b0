"""`erw launch [--spec JSON|FILE] [flags] -- warmup|train ...`: one flag per LaunchSpec field.

The flags are generated from the dataclass, so a new setting is added in one place. A flag given
explicitly overrides the spec's value; a flag not given leaves it alone. The erw command after
'--' is read with the training commands' own parser (not the whole CLI's, which imports this).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import typing
from dataclasses import dataclass

from erw.launch.spec import (
    SCHEDULERS,
    LaunchError,
    LaunchSpec,
    parse_key_value,
    parse_toleration,
)
from erw.launch.volcano import (
    INSTANCE_TYPE_LABEL,
    RUN_ID_LABEL,
    STEP_LABEL,
    name_problems,
)

HELP = {
    "scheduler": "local_cwd: torchrun processes here; kubernetes: a Volcano job",
    "image": "container image (kubernetes)",
    "procs_per_node": "torchrun processes per node (one per GPU)",
    "memory_gb": "memory per node (GB)",
    "node_selector": "node pool label (repeatable)",
    "tolerations": "kubectl taint syntax (repeatable)",
    "env": "job environment (repeatable)",
    "s3_secret": "Kubernetes Secret with the S3 credentials, as envFrom (kubernetes)",
    "queue": "Volcano queue (kubernetes)",
    "namespace": "namespace of the job (default: this pod's, else 'default')",
    "service_account": "service account of the job's pods (kubernetes)",
    "priority_class": "PriorityClass of the job (kubernetes)",
    "name": "job name prefix (default erw-<command>)",
    "instance_type": f"node type, as the {INSTANCE_TYPE_LABEL} label",
    "timeout": "deadline of the whole job, e.g. 45m, 72h; the job is deleted when it passes",
    "pending_timeout": "fail with the scheduler's reasons (and delete the job) if it is Pending this long",
    "max_restarts": "restarts of the whole job after its first run (a pod failed or was evicted)",
    "resubmit_preempted": "times a preempted job is submitted again to continue from its checkpoint (needs --resume auto)",
    "metrics_port": "base /metrics port to declare on the pods (rank r: port + r)",
    "run_id": f"run id: ERW_RUN_ID in the job and the {RUN_ID_LABEL} label",
    "step": f"{STEP_LABEL} label (default: the erw command); with --run-id a relaunch re-attaches to the job",
    "grace_period_s": "terminationGracePeriodSeconds of the pods: time for the checkpoint on SIGTERM",
}
# Fields typed as repeatable flags: flag name, metavar, parser of one occurrence.
REPEATABLE = {
    "node_selector": ("--node-selector", "KEY=VALUE", lambda text: parse_key_value(text, "--node-selector")),
    "tolerations": ("--toleration", "KEY[=VALUE][:EFFECT]", parse_toleration),
    "env": ("--env", "KEY=VALUE", lambda text: parse_key_value(text, "--env")),
}


@dataclass(frozen=True)
class TrainingCommand:
    phase: str  # warmup | train
    config: str
    overrides: tuple[str, ...]


def _training_parser() -> tuple[argparse.ArgumentParser, tuple[str, ...]]:
    from erw.training import commands

    parser = argparse.ArgumentParser(prog="erw", add_help=False)
    sub = parser.add_subparsers(dest="command", required=True)
    commands.register(sub)
    return parser, tuple(sub.choices)


def parse_command(argv: list[str]) -> TrainingCommand:
    """`["train", "--config", "c.yaml", "train.lr=1e-4"]` -> TrainingCommand, or LaunchError saying why not."""
    parser, launchable = _training_parser()
    if not argv or argv[0] not in launchable:
        got = argv[0] if argv else "nothing"
        raise LaunchError(f"the command after '--' must be one of: erw {' | '.join(launchable)} ... (got {got!r})")
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = parser.parse_args(argv)
    except SystemExit:
        reason = stderr.getvalue().strip().splitlines()[-1:] or ["cannot parse it"]
        raise LaunchError(f"the command after '--' ({' '.join(argv)}): {reason[0]}") from None
    return TrainingCommand(phase=args.phase, config=args.config, overrides=tuple(args.overrides))


def check_config(command: TrainingCommand, world_size: int) -> None:
    """Validate the training config for the job's world size here, not after the GPUs are allocated."""
    from erw.config import load_config, validate

    validate(load_config(command.config, list(command.overrides)), world_size, command.phase)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch",
        help="run erw warmup|train as a torchrun job (TorchX: local processes or a Volcano job)",
        description="Run `erw warmup|train ...` on N nodes x P processes and wait for it. "
        "Everything after '--' is the erw command. Settings come from --spec (a JSON object or file "
        "with LaunchSpec keys) and the flags; a flag given explicitly wins.",
    )
    p.add_argument("--spec", default=None, metavar="JSON|FILE", help="launch settings as one JSON object")
    defaults = LaunchSpec()
    hints = typing.get_type_hints(LaunchSpec)
    for f in dataclasses.fields(LaunchSpec):
        default = getattr(defaults, f.name)
        text = HELP.get(f.name, "")
        if f.name in REPEATABLE:
            flag, metavar, _ = REPEATABLE[f.name]
            p.add_argument(flag, dest=f.name, action="append", default=argparse.SUPPRESS, metavar=metavar, help=text)
            continue
        kind = hints[f.name]
        extra = {"choices": SCHEDULERS} if f.name == "scheduler" else {"type": kind}
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=argparse.SUPPRESS,
            help=f"{text} (default: {default})".lstrip() if default not in ("", 0) else text,
            **extra,
        )
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted and exit")
    p.add_argument("command_line", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    p.set_defaults(func=_run)


def spec_from_args(args: argparse.Namespace) -> tuple[LaunchSpec, list[str]]:
    """(the spec: --spec, then the explicit flags on top; the erw command after '--')."""
    spec = LaunchSpec.parse(args.spec) if args.spec else LaunchSpec()
    changes = {}
    for f in dataclasses.fields(LaunchSpec):
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if f.name in REPEATABLE:
            parsed = [REPEATABLE[f.name][2](text) for text in value]
            value = parsed if f.name == "tolerations" else dict(parsed)
        changes[f.name] = value
    command = list(args.command_line)
    if command[:1] == ["--"]:
        command = command[1:]
    return spec.replace(**changes), command


def _run(args: argparse.Namespace) -> int:
    import logging

    from erw.launch.run import dry_run, launch

    logging.getLogger("torchx").setLevel(logging.WARNING)  # its INFO lines (log dirs, trackers) are noise here
    spec, command = spec_from_args(args)
    found = spec.problems() + name_problems(spec, command)
    if found:
        raise LaunchError("cannot launch:\n  - " + "\n  - ".join(found))
    check_config(parse_command(command), spec.nodes * spec.procs_per_node)
    if args.dry_run:
        import yaml

        request = dry_run(spec, command)
        print(yaml.safe_dump(request, sort_keys=False) if isinstance(request, dict) else request)
        return 0
    launch(spec, command)
    return 0
