"""Write the locks: every distribution erw installs, pinned with its hashes, resolved by uv.

    make lock                       # after changing dependencies in pyproject.toml
    make lock UPGRADE=--upgrade     # move every pin to the newest release the specifiers allow

  locks/runtime.txt  what the image installs: pyproject's dependencies and its build backend
  locks/dev.txt      what the dev venv installs: the same pins plus the mlflow, dev and bench extras

One resolution feeds both: dev.txt is resolved with runtime.txt as constraints, so the venv that
`make test` checks holds exactly the versions the image ships. The locks are universal (markers
per platform and Python), so one file serves the Linux image, a Linux laptop and a Mac. An existing
lock's pins are kept unless a specifier no longer admits them (uv reads the output file as its
preferences), so regenerating changes only what has to change.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
from pathlib import Path

HERE = Path(__file__).parent
PYPROJECT = HERE.parent / "pyproject.toml"
RUNTIME = HERE / "runtime.txt"
DEV = HERE / "dev.txt"
DEV_EXTRAS = ("mlflow", "dev", "bench")
# The oldest Python the image and the dev venv run; the locks hold markers for newer ones.
PYTHON = "3.11"


def build_requirements() -> str:
    """pyproject's build-system requirements: locked too, so `pip install --no-build-isolation`
    builds erw with the pinned setuptools instead of fetching whatever is newest."""
    return "\n".join(tomllib.loads(PYPROJECT.read_text())["build-system"]["requires"]) + "\n"


def compile_lock(output: Path, extra_args: list[str]) -> None:
    command = [
        sys.executable, "-m", "uv", "pip", "compile", "pyproject.toml", "-",
        "--universal", "--python-version", PYTHON, "--generate-hashes", "--system-certs",
        "--custom-compile-command", "make lock", "--quiet",
        "-o", str(output.relative_to(PYPROJECT.parent)), *extra_args,
    ]  # fmt: skip
    subprocess.run(command, input=build_requirements(), text=True, check=True, cwd=PYPROJECT.parent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upgrade", action="store_true", help="newest releases, not the current pins")
    upgrade = ["--upgrade"] if parser.parse_args().upgrade else []
    compile_lock(RUNTIME, upgrade)
    compile_lock(
        DEV,
        [*upgrade, *(f"--extra={e}" for e in DEV_EXTRAS), "--constraint", str(RUNTIME.relative_to(PYPROJECT.parent))],
    )
    for lock in (RUNTIME, DEV):
        pins = sum(1 for line in lock.read_text().splitlines() if line[:1].isalnum())
        print(f"{lock.relative_to(PYPROJECT.parent)}: {pins} pins")


if __name__ == "__main__":
    main()
