"""`erw` command line. Each area registers its own sub-commands; heavy imports stay inside them."""

from __future__ import annotations

import argparse
import importlib
import sys

from erw.errors import ErwError

# Modules with a `register(subparsers)` function, in the order `erw --help` lists them.
COMMAND_MODULES = (
    "erw.data.commands",
    "erw.training.commands",
    "erw.models.commands",
    "erw.evaluation.commands",
    "erw.launch.commands",
    "pipeline.cli",
    "erw.promote",
    "erw.gc",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="erw", description="Train diffusion transformers with ERW.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ErwError as err:
        print(f"erw {args.command}: error: {err}", file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        print(f"erw {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
