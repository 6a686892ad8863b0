"""Run the throughput benchmarks in bench/ and put what they print into docs/results.md.

    nice -n 5 .venv/bin/python -m bench.run_all                 # every benchmark present
    .venv/bin/python -m bench.run_all --only step_throughput     # a subset

Each benchmark prints its ratios, measured side by side in one run; this script runs them one
after the other (never in parallel: they would measure each other), records the command, the
exit status and the output, and rewrites the "throughput" section of the results file with the
date and the machine. A benchmark that fails is reported as failed, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass

from bench.results_md import RESULTS, ROOT, machine, write_section

# name -> arguments. torch.compile of a SiT did not finish within 15 minutes on a 2-core CPU, so
# the compiled/eager ratio is left to bench/gpu_check.sh, which measures it on a GPU.
BENCHMARKS = {
    "step_throughput": ["--no-compile"],
    "loader_throughput": [],
    "sampling_throughput": [],
    "metrics_overhead": [],
}
OUTPUT_LINES = 60  # the tail kept per benchmark: tables, not progress chatter


@dataclass
class Outcome:
    name: str
    command: str
    status: int  # exit status; -1 = timed out
    seconds: float
    output: str


def run_benchmark(name: str, arguments: list[str], timeout: float) -> Outcome:
    command = [sys.executable, "-m", f"bench.{name}", *arguments]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        status, output = done.returncode, done.stdout if done.returncode == 0 else done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        status, output = -1, f"{(err.stdout or b'').decode(errors='replace')}\ntimed out after {timeout:.0f} s"
    tail = "\n".join(output.strip().splitlines()[-OUTPUT_LINES:])
    shown = " ".join(["python", "-m", f"bench.{name}", *arguments])
    return Outcome(name, shown, status, time.perf_counter() - started, tail)


def section(outcomes: list[Outcome]) -> str:
    lines = [
        "## Throughput benchmarks",
        "",
        f"Reproduce: `nice -n 5 .venv/bin/python -m bench.run_all` — {machine()}. Each benchmark measures its "
        "alternatives side by side in one process; compare the ratios, not the absolute numbers, across machines.",
    ]
    for o in outcomes:
        state = "ok" if o.status == 0 else "TIMED OUT" if o.status == -1 else f"FAILED (exit {o.status})"
        lines += ["", f"### {o.name} ({state}, {o.seconds:.0f} s)", "", f"`{o.command}`", "", "```", o.output, "```"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated, from {', '.join(BENCHMARKS)}")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark")
    parser.add_argument("--results", default=str(RESULTS), help="markdown file to update")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}: choose from {', '.join(BENCHMARKS)}")
    outcomes = []
    for name in names:
        print(f"running python -m bench.{name} ...", flush=True)
        outcomes.append(run_benchmark(name, BENCHMARKS[name], args.timeout))
        print(outcomes[-1].output, flush=True)
    write_section(args.results, "throughput", section(outcomes))
    print(f"wrote the throughput section of {args.results}")
    return 0 if all(o.status == 0 for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
