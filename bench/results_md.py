"""docs/results.md is assembled from sections, each owned by one bench script.

A section lives between `<!-- BEGIN name -->` and `<!-- END name -->`; a script rewrites only its
own, so the convergence study, the sweeps and the throughput report can be rerun independently.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results.md"
HEADER = "# Results\n\nMeasured by the scripts in `bench/`; each section names the command that reproduces it.\n"
ORDER = ("convergence", "sweeps", "throughput")  # where a new section goes relative to the others


def write_section(path: str | Path, name: str, body: str) -> None:
    """Replace (or add, in ORDER) the section `name` of the markdown file at `path`."""
    path = Path(path)
    text = path.read_text() if path.exists() else HEADER
    block = f"<!-- BEGIN {name} -->\n{body.strip()}\n<!-- END {name} -->"
    pattern = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        later = [n for n in ORDER[ORDER.index(name) + 1 :]] if name in ORDER else []
        anchor = next((m for n in later if (m := re.search(rf"<!-- BEGIN {re.escape(n)} -->", text))), None)
        if anchor:
            text = text[: anchor.start()] + block + "\n\n" + text[anchor.start() :]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def machine() -> str:
    """One line: CPU model, cores this process may use, torch version, date."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{datetime.date.today().isoformat()}, {cpu}, {cores} cores{load}, torch {torch.__version__}"
