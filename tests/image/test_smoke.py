"""The built image, checked from the inside: what it runs, what it contains, what it refuses."""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from packaging.utils import canonicalize_name

from erw.cli import build_parser
from tests.image.engine import REPO
from tests.locks import LOCKS, pins_here

pytestmark = pytest.mark.image


def run_in(engine, image: str, script: str, *flags: str) -> subprocess.CompletedProcess:
    """A shell script in a container of the image: as its user, read-only root, /tmp a tmpfs."""
    return engine("run", "--rm", *engine.read_only, "--tmpfs", "/tmp:rw,mode=1777", *flags, image, "sh", "-c", script)


def erw_commands() -> list[list[str]]:
    """Every erw command and subcommand, read from the CLI's own parser."""

    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> list[list[str]]:
        found = [prefix]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found += walk(sub, [*prefix, name])
        return found

    return walk(build_parser(), [])


def test_every_command_answers_help_as_the_runtime_user(engine, image):
    commands = erw_commands()
    assert len(commands) > 15 and ["pipeline", "compile"] in commands and ["launch"] in commands
    script = "set -e; id -u; " + "; ".join(f"erw {' '.join(c)} --help > /dev/null" for c in commands)
    result = run_in(engine, image, script)
    assert result.stdout.split() == ["1000"], result.stdout + result.stderr
    print(f"\n{len(commands)} erw commands answer --help as uid 1000 on a read-only root")


def test_pipeline_compiled_inside_the_image_equals_the_checked_in_one(engine, image):
    compiled = run_in(engine, image, "erw pipeline compile --out /tmp/p.yaml > /dev/null && cat /tmp/p.yaml").stdout
    # As data: the compiler's header comment prints map defaults in hash order (tests/test_pipeline.py).
    assert list(yaml.safe_load_all(compiled)) == list(yaml.safe_load_all((REPO / "pipeline.yaml").read_text()))


def test_the_image_holds_exactly_the_runtime_lock(engine, image):
    frozen = run_in(engine, image, "python3 -m pip check > /dev/null && python3 -m pip list --format=freeze").stdout
    installed = {canonicalize_name(n): v for n, v in (line.split("==") for line in frozen.split())}
    locked = pins_here(LOCKS / "runtime.txt")  # the image is Linux x86_64 with Python 3.11, as this machine
    wrong = {n: (installed.get(n), v) for n, v in locked.items() if installed.get(n, "").split("+")[0] != v}
    assert not wrong, f"image != locks/runtime.txt (installed, locked): {wrong}"


def test_the_runtime_user_cannot_change_the_installed_code(engine, image):
    script = (
        "site=$(python3 -c 'import erw, os; print(os.path.dirname(os.path.dirname(erw.__file__)))'); "
        'for target in "$site/erw/cli.py" "$site/newfile" /opt/erw/bin/erw; do '
        '  if (echo x >> "$target") 2>/dev/null; then echo "writable: $target"; fi; '
        "done"
    )
    # Even with a writable root filesystem (docker run without --read-only), the files are root's.
    result = engine("run", "--rm", image, "sh", "-c", script)
    assert result.stdout == "", result.stdout


def test_the_build_secret_left_no_certificate_in_the_image(engine, image):
    """The CA bundle given to the build (container/build.sh) reached pip only: no certificate of
    this machine's own (the TLS proxy's, /usr/local/share/ca-certificates) is in the image."""
    local = sorted(Path("/usr/local/share/ca-certificates").rglob("*.crt"))
    bundle = run_in(engine, image, "cat /etc/ssl/certs/ca-certificates.crt; ls /run/secrets 2>/dev/null || true").stdout
    for cert in local:
        body = "".join(re.findall(r"^[A-Za-z0-9+/=]+$", cert.read_text(), re.M)[:3])
        assert body and body not in bundle.replace("\n", ""), f"{cert} is in the image"
    assert "pip_ca" not in bundle
