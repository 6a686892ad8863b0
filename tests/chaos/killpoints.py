"""Kill the checkpoint writer at many points of its writes, then `--resume auto`; report each point.

    python tests/chaos/killpoints.py --shards DIR --out ROOT --work DIR --report FILE.json [--points N]

One process imports torch and erw once and forks one child per run (a real process, really
SIGKILLed by erw/faults.py's ERW_FAULT_CKPT_BYTES inside the writer; its output goes to
WORK/<point>-<run>.log). ROOT is a local folder or s3://bucket/prefix. For each kill point:

    1. `erw train --resume auto` (single process, STEPS steps, a checkpoint every CKPT_EVERY) with
       the byte budget: killed mid-write (or, for ":raise" points, failing as on a full disk);
    2. what `--resume auto` would load (checkpoint.load_latest_verified) must be a checkpoint that
       verifies and equals, tensor by tensor, the uninterrupted run's checkpoint of that step;
    3. `erw train --resume auto` without faults finishes, bit-identical to the uninterrupted run.

The budgets cover each file of the first two checkpoints at its first byte, middle and last byte,
plus two full-disk failures. The report is a JSON list, one object per point.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch

from erw import cli, faults, storage
from erw.training import checkpoint as ckpt
from harness import ROOT, TINY, identical  # run as a script: its folder is on the path

STEPS, CKPT_EVERY = 4, 2
FILES = (ckpt.MODEL, ckpt.EMA, ckpt.STATE, ckpt.META)  # the order the writer stores them


def train_argv(shards: str, out: str) -> list[str]:
    return [
        "train",
        "--config",
        str(ROOT / "configs/demo.yaml"),
        f"data.shards={shards}",
        *TINY,
        f"train.steps={STEPS}",
        f"train.ckpt_every={CKPT_EVERY}",
        "train.keep_last=10",
        f"train.out={out}",
        "--resume",
        "auto",
    ]


def child(argv: list[str], env: dict[str, str], log: Path) -> int:
    """Run `erw ARGV` in a forked child with env added; its exit status (-9 when SIGKILLed)."""
    pid = os.fork()
    if pid == 0:  # the child: a fresh injector, output to its log, never returns
        status = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.environ.update(env)
            faults.configure()
            status = cli.main(argv)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def budgets(sizes: list[list[int]], points: int) -> list[str]:
    """Byte budgets over the first two checkpoints, from the sizes of their files in the
    uninterrupted run: each file's first, middle and last byte (for meta.json, whose length varies
    from run to run with its timestamps and the output location it records, a byte in its last
    quarter: the reference run writes to a local folder, the killed runs maybe to S3), evenly thinned to
    points - 2, plus two full-disk failures."""
    found, offset = [], 0
    for checkpoint in sizes:
        for name, size in zip(FILES, checkpoint):
            found += [offset, offset + size // 2, offset + size - (max(64, size // 4) if name == ckpt.META else 1)]
            offset += size
    found = sorted(set(found))
    if points - 2 < len(found):
        found = [found[round(i * (len(found) - 1) / max(1, points - 3))] for i in range(points - 2)]
    first = sizes[0]
    return [str(b) for b in found] + [f"{first[0] // 2}:raise", f"{sum(first) + first[0] + 10}:raise"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True)
    parser.add_argument("--out", required=True, help="local folder or s3://bucket/prefix for the runs")
    parser.add_argument("--work", required=True, help="local folder: logs and the uninterrupted run")
    parser.add_argument("--report", required=True)
    parser.add_argument("--points", type=int, default=26, help="at most this many kill points")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    reference = str(work / "uninterrupted")
    if child(train_argv(args.shards, reference), {}, work / "uninterrupted.log") != 0:
        print((work / "uninterrupted.log").read_text(), file=sys.stderr)
        return 1
    sizes = [
        [(Path(ckpt.step_uri(reference, step)) / name).stat().st_size for name in FILES]
        for step in (CKPT_EVERY, 2 * CKPT_EVERY)
    ]

    report = []
    for i, budget in enumerate(budgets(sizes, args.points)):
        out = storage.join(args.out, f"point-{i:02d}")
        killed_log, resumed_log = work / f"{i:02d}-killed.log", work / f"{i:02d}-resumed.log"
        status = child(train_argv(args.shards, out), {faults.CKPT_BYTES_ENV: budget}, killed_log)
        text = killed_log.read_text()
        cut = re.search(
            r"checkpoint write of (\S+) fails after (\d+) of (\d+) bytes|"
            r"checkpoint writer killed after (\d+) of (\d+) bytes of (\S+)",
            text,
        )
        where = ""
        if cut:
            uri, done, size = (
                (cut.group(1), cut.group(2), cut.group(3))
                if cut.group(1)
                else (cut.group(6), cut.group(4), cut.group(5))
            )
            where = f"{uri.rstrip('/').rsplit('/', 2)[-2]}/{uri.rsplit('/', 1)[-1]} after {done}/{size} B"
        committed = [step for step, _ in ckpt.list_checkpoints(out)]
        chosen_step, chosen_ok, error = None, None, ""
        try:
            chosen, _skipped = ckpt.load_latest_verified(out)
            if chosen is not None:
                chosen_step = chosen.step
                chosen_ok = identical(chosen.uri, ckpt.step_uri(reference, chosen.step))[0]
        except ckpt.CheckpointError as err:
            error = str(err)
        resumed = child(train_argv(args.shards, out), {}, resumed_log)
        final = ckpt.latest_checkpoint(out)
        same = identical(final, ckpt.step_uri(reference, STEPS))[0] if resumed == 0 and final else False
        reached = [int(s) for s in re.findall(r"^train step (\d+)/", text, re.M)]
        report.append(
            {
                "budget": budget,
                "status": status,
                "cut": where,
                "committed": committed,
                "resume_auto_loads": chosen_step,
                "loaded_equals_uninterrupted": chosen_ok,
                "error": error,
                "steps_lost": (max(reached) if reached else 0) - (chosen_step or 0),
                "resumed_status": resumed,
                "final_identical": same,
            }
        )
        print(json.dumps(report[-1]), flush=True)
    Path(args.report).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
