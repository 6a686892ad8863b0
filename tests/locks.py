"""Reading the lock files (locks/*.txt, written by `make lock`): pins, markers and hashes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from packaging.markers import Marker
from packaging.utils import canonicalize_name

LOCKS = Path(__file__).resolve().parents[1] / "locks"


@dataclass(frozen=True)
class Pin:
    name: str  # canonical
    version: str
    marker: Marker | None
    hashes: frozenset[str]

    def applies(self, environment: dict[str, str] | None = None) -> bool:
        return self.marker is None or self.marker.evaluate(environment)


def read_lock(text: str) -> list[Pin]:
    """Every pin of a lock in uv's requirements format: `name==version ; marker \\` followed by
    `--hash=sha256:...` lines and `# via` comments."""
    pins: list[Pin] = []
    name = version = None
    marker: Marker | None = None
    hashes: set[str] = set()

    def close() -> None:
        if name is not None:
            pins.append(Pin(name, version, marker, frozenset(hashes)))

    for raw in text.splitlines():
        line = raw.strip().removesuffix("\\").strip()
        if not line or line.startswith("#"):
            continue
        if raw[:1].isalnum():
            close()
            requirement, _, condition = line.partition(";")
            package, sep, version = requirement.strip().partition("==")
            assert sep, f"not an exact pin: {raw!r}"
            name, marker, hashes = canonicalize_name(package), Marker(condition) if condition.strip() else None, set()
        elif line.startswith("--hash="):
            hashes.add(line.removeprefix("--hash="))
    close()
    return pins


def pins_here(path: Path) -> dict[str, str]:
    """name -> version of the pins whose markers hold on this interpreter and platform."""
    return {p.name: p.version for p in read_lock(path.read_text()) if p.applies()}
