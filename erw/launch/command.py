"""The erw command a launched job runs (`warmup|train --config ... overrides`), read before submitting.

It is parsed with the training commands' own parser (erw.training.commands), not the whole CLI's,
so the launcher does not import the command line that imports it.
"""
from __future__ import annotations

import argparse
import contextlib
import io
from dataclasses import dataclass

from erw.launch.spec import LaunchError


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
