"""The chaos matrix: each fault of a real cluster injected into a tiny 2-rank training run, and what it cost.

    python -m bench.chaos [--work DIR] [--points 20] [--results docs/results.md]

Every run is `erw train --resume auto` of the tiny demo model (tests/chaos/harness.py: a 4-block,
64-wide SiT on the digits shards, 8 steps, a checkpoint every 2, one DataLoader worker per rank)
as 2 processes under `erw torchrun` on CPU/gloo, faults injected by erw/faults.py (ERW_FAULT_*)
and, for S3, by tests/s3proxy.py in front of a moto server on 127.0.0.1. Every run is compared
with an uninterrupted run of the same settings:

    survived      the job reached the final step (by itself, or after the `--resume auto` rerun
                  that a retried pipeline step or a restarted Volcano job would make)
    steps lost    optimizer steps computed, then thrown away because no checkpoint held them
    identical     final model and EMA weights equal, tensor by tensor
    twice/never   sample draws trained on more often / less often than in the uninterrupted
                  run, from each rank's trace of the batches it took (ERW_FAULT_TRACE), counting
                  only the batches whose updates survived; "same order" when the sequences match

The kill-point rows run tests/chaos/killpoints.py (single process, 4 steps: its own
uninterrupted reference) and summarise its points. Prints one Markdown table and writes it to the
"chaos" section of docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from erw import faults
from erw.training import checkpoint as ckpt
from tests.chaos.harness import (
    STEPS,
    Outcome,
    compare_samples,
    effective,
    first_shard,
    free_port,
    identical,
    make_shards,
    read_trace,
    run,
    schedule_s3_blips,
    steps_lost,
    train_command,
    upload_tree,
)

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    fault: str
    injected_at: str
    survived: str
    steps_lost: str = "-"
    identical: str = "-"
    samples: str = "-"


class Matrix:
    def __init__(self, work: Path, shards: Path):
        self.work, self.shards = work, shards
        ref = self.fresh("uninterrupted")
        outcome = run(train_command(str(shards), "out"), ref, env=self.trace(ref))
        if outcome.status != 0:
            raise SystemExit(f"the uninterrupted run failed:\n{outcome.output}")
        self.final = ckpt.step_uri(str(ref / "out"), STEPS)
        self.reference = effective(read_trace(ref / "trace"), [0])

    def fresh(self, name: str) -> Path:
        folder = self.work / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder

    @staticmethod
    def trace(folder: Path) -> dict[str, str]:
        return {faults.TRACE_ENV: str(folder / "trace")}

    def judge(
        self,
        row: Row,
        folder: Path,
        out: str,
        outcome: Outcome,
        steps: int = STEPS,
        reference: tuple[str, dict[int, list[int]]] | None = None,
    ) -> Row:
        """Fill survived / steps lost / identical / samples for a run whose log is outcome, against
        the uninterrupted run of `steps` steps (reference: its final checkpoint and samples)."""
        want_final, want_samples = reference or (self.final, self.reference)
        final = ckpt.latest_checkpoint(out)
        reached = final is not None and ckpt.load_checkpoint(final, with_train_state=False).step == steps
        row.survived = "yes" if reached else f"no (exit {outcome.status})"
        if not reached:
            return row
        same, diff = identical(ckpt.step_uri(out, steps), want_final)
        row.identical = "yes" if same else f"no (max diff {diff:.1e})"
        trace = read_trace(folder / "trace")
        starts = outcome.resumed_at()
        row.steps_lost = str(steps_lost(trace, starts))
        counts = compare_samples(effective(trace, starts), want_samples)
        row.samples = f"{counts.twice} / {counts.never}" + (", same order" if counts.same_order else ", other order")
        return row

    def kill_then_resume(self, fault: str, spec: str, restarts: int | None) -> Row:
        folder = self.fresh(f"kill-{spec.replace(':', '-')}-{restarts}")
        env = {**self.trace(folder), faults.KILL_ENV: spec}
        first = run(train_command(str(self.shards), "out", restarts=restarts), folder, env=env, timeout=600)
        rank, step = spec.split(":")[:2]
        how = f"rank {rank}, after step {step}"
        if restarts is None:
            how += f"; job exit {first.status}, then a new `--resume auto` job"
            second = run(train_command(str(self.shards), "out"), folder, env=self.trace(folder), timeout=600)
            first = Outcome(second.status, first.output + second.output, first.seconds + second.seconds)
        else:
            how += f"; torchrun --max-restarts {restarts}, c10d; job exit {first.status}"
        return self.judge(Row(fault, how, ""), folder, str(folder / "out"), first)

    def corrupt_newest_checkpoint(self) -> Row:
        folder = self.fresh("corrupt-checkpoint")
        shutil.copytree(Path(self.final).parent, folder / "out")
        for step in (8, 7):
            shutil.rmtree(folder / f"out/step-{step:08d}", ignore_errors=True)
        model = folder / "out/step-00000006" / ckpt.MODEL
        data = bytearray(model.read_bytes())
        data[len(data) // 2] ^= 0xFF
        model.write_bytes(bytes(data))
        outcome = run(train_command(str(self.shards), "out"), folder, env=self.trace(folder))
        skipped = "skipped" in outcome.output and "step-00000006" in outcome.output
        row = Row("newest checkpoint corrupt (1 byte flipped)", "step 6 of 8, before `--resume auto`", "")
        row = self.judge(row, folder, str(folder / "out"), outcome)
        row.survived += ", step 6 skipped and named" if skipped else ", NOT skipped"
        # The run before the corruption had reached step 6: the resume recomputes 5 and 6.
        row.steps_lost = "2 (5-6, recomputed)"
        row.samples = "-"  # the trace holds only the resumed run
        return row

    def s3_faults(self, endpoint: str) -> Row:
        import boto3
        from tests.s3proxy import FaultProxy

        folder = self.fresh("s3")
        bucket = f"chaos-{os.getpid()}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        upload_tree(self.shards, f"s3://{bucket}/shards")
        with FaultProxy(endpoint) as proxy:
            on_line = schedule_s3_blips(proxy)

            env = {
                **self.trace(folder),
                "AWS_ENDPOINT_URL": proxy.url,
                "ERW_S3_RETRY_SECONDS": "30",
                "ERW_S3_STALL_SECONDS": "2",
            }
            outcome = run(
                train_command(f"s3://{bucket}/shards", f"s3://{bucket}/out"), folder, env=env, on_line=on_line
            )
            injected = dict(proxy.injected)
        what = ", ".join(f"{n} {k}" for k, n in sorted(injected.items()))
        row = Row(
            "S3: 5xx, SlowDown, resets, a stalled read, a 5 s outage", f"from the start; outage at step 3 ({what})", ""
        )
        return self.judge(row, folder, f"s3://{bucket}/out", outcome)

    def s3_outage_past_the_budget(self, endpoint: str) -> Row:
        """Shards on S3, an outage from step 3 until the job has given up: the run checkpoints the step
        it reached (checkpoints on local disk) and exits 2; a new `--resume auto` job continues from it.
        40 steps without periodic checkpoints, so the loader still has shards to read after step 3 (an
        8-step run has read all it needs by then) and the outage's checkpoint is the only one."""
        import boto3
        from tests.s3proxy import FaultProxy

        steps, extra = 40, ("train.ckpt_every=1000",)
        folder = self.fresh("s3-outage")
        ref = run(
            train_command(str(self.shards), "reference", steps=steps, extra=extra),
            folder,
            env={faults.TRACE_ENV: str(folder / "reference-trace")},
        )
        if ref.status != 0:
            return Row(
                "S3 outage past the retry budget (shards on S3)", "-", f"reference run failed (exit {ref.status})"
            )
        reference = (
            ckpt.step_uri(str(folder / "reference"), steps),
            effective(read_trace(folder / "reference-trace"), [0]),
        )
        bucket = f"chaos-outage-{os.getpid()}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        upload_tree(self.shards, f"s3://{bucket}/shards")
        with FaultProxy(endpoint) as proxy:

            def on_line(line: str) -> None:
                if line.startswith("train step 3/"):
                    proxy.outage(3600)  # until cleared below, after the job has given up

            env = {**self.trace(folder), "AWS_ENDPOINT_URL": proxy.url, "ERW_S3_RETRY_SECONDS": "2"}
            command = train_command(f"s3://{bucket}/shards", "out", steps=steps, extra=extra)
            first = run(command, folder, env=env, on_line=on_line, timeout=600)
            proxy.clear()
            second = run(command, folder, env=env, timeout=600)
        checkpointed = re.search(r"storage failed at step (\d+); checkpointing step \1 before exiting", first.output)
        how = (
            f"from step 3 until the job gave up (retry budget 2 s; 40 steps); job exit {first.status}, "
            + (f"step {checkpointed[1]} checkpointed" if checkpointed else "NO checkpoint attempt seen")
            + ", then a new `--resume auto` job"
        )
        both = Outcome(second.status, first.output + second.output, first.seconds + second.seconds)
        row = Row("S3 outage past the retry budget (shards on S3)", how, "")
        return self.judge(row, folder, str(folder / "out"), both, steps, reference)

    def corrupt_shard(self, mode: str) -> Row:
        folder = self.fresh(f"shard-{mode}")
        name = first_shard(self.shards)
        outcome = run(
            train_command(str(self.shards), "out", ranks=1),
            folder,
            env={faults.CORRUPT_SHARD_ENV: f"{name}:{mode}"},
            timeout=120,
        )
        last = outcome.output.strip().splitlines()[-1] if outcome.output.strip() else ""
        reported = outcome.status == 2 and name in last and "Traceback" not in outcome.output
        verdict = (
            "stopped with one clear line (exit 2), by design"
            if reported
            else f"NOT reported cleanly (exit {outcome.status}{', hang' if outcome.status == 124 else ''})"
        )
        return Row(
            f"shard {'truncated' if mode == 'truncate' else 'flipped'} halfway ({name})",
            "first shard read, 1 process",
            f"no: {verdict}",
        )

    def kill_points(self, out: str, label: str, points: int) -> list[Row]:
        folder = self.fresh(f"points-{label.replace(' ', '-')}")
        report = folder / "report.json"
        proc = subprocess.run(
            [
                sys.executable,
                str(ROOT / "tests/chaos/killpoints.py"),
                "--shards",
                str(self.shards),
                "--out",
                out,
                "--work",
                str(folder / "work"),
                "--report",
                str(report),
                "--points",
                str(points),
            ],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if proc.returncode != 0:
            return [Row(f"checkpoint writer killed ({label})", "-", f"driver failed: {proc.stderr[-300:]}")]
        data = json.loads(report.read_text())
        rows = []
        unkilled = [p["budget"] for p in data if p["status"] == 0]
        if unkilled:  # a budget past the bytes this run wrote: no fault happened, nothing to judge
            rows.append(Row(f"checkpoint writer ({label})", f"budgets {', '.join(unkilled)} B", "not injected"))
        for kind, picked in (
            ("SIGKILL", [p for p in data if p["status"] == -9]),
            ("full disk (ENOSPC)", [p for p in data if p["budget"].endswith(":raise")]),
        ):
            if not picked:
                continue
            good = [
                p
                for p in picked
                if p["resume_auto_loads"] == max(p["committed"], default=None)
                and p["loaded_equals_uninterrupted"] in (True, None)
                and p["final_identical"]
            ]
            lost = sorted({p["steps_lost"] for p in picked})
            rows.append(
                Row(
                    f"checkpoint writer: {kind} mid-write, {label}",
                    f"{len(picked)} byte offsets in 2 checkpoints",
                    f"{len(good)}/{len(picked)}: `--resume auto` loaded the newest verified checkpoint",
                    "-".join(map(str, [lost[0], lost[-1]])) if len(lost) > 1 else str(lost[0]),
                    f"{sum(p['final_identical'] for p in picked)}/{len(picked)}",
                    "-",
                )
            )
        return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--points", type=int, default=20, help="kill points per checkpoint-writer row")
    parser.add_argument(
        "--results", default=str(ROOT / "docs" / "results.md"), help="markdown file to update ('' : none)"
    )
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    work = Path(args.work or tempfile.mkdtemp(prefix="erw-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    try:
        shards = work / "data/shards" if (work / "data/shards/manifest.json").exists() else None
        if shards is None:
            (work / "data").mkdir(exist_ok=True)
            shards = make_shards(work / "data")
        m = Matrix(work, shards)
        rows = [Row("none (the uninterrupted run)", "-", "yes", "0", "yes (itself)", "0 / 0")]
        rows.append(m.kill_then_resume("SIGKILL one rank (a lost node)", "1:5", None))
        rows.append(m.kill_then_resume("SIGKILL one rank, restart in place", "1:5", 2))
        rows.append(m.kill_then_resume("SIGKILL rank 0 (hosts the store), restart in place", "0:5", 2))
        rows.append(m.kill_then_resume("SIGTERM one rank (preemption), then resume", "1:5:TERM", None))
        rows.append(m.corrupt_newest_checkpoint())
        rows += m.kill_points(str(work / "points-disk-runs"), "local disk", args.points)
        import boto3

        boto3.client("s3").create_bucket(Bucket="chaos-points")
        rows += m.kill_points("s3://chaos-points/runs", "S3", args.points)
        rows.append(m.s3_faults(endpoint))
        rows.append(m.s3_outage_past_the_budget(endpoint))
        rows += [m.corrupt_shard("truncate"), m.corrupt_shard("flip")]
    finally:
        server.stop()

    from bench.results_md import machine, write_section

    table = [
        "| fault | injected at | survived | steps lost | final weights bit-identical | samples twice / never |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r.fault} | {r.injected_at} | {r.survived} | {r.steps_lost} | {r.identical} | {r.samples} |"
            for r in rows
        ),
    ]
    body = "\n".join(
        [
            "## Chaos",
            "",
            f"`python -m bench.chaos` ({machine()}; {time.monotonic() - started:.0f} s). Each fault is injected into",
            "a tiny 2-rank `erw torchrun` run (8 steps, a checkpoint every 2; kill-point rows: 1 process, 4 steps)",
            "and compared with the uninterrupted run: see the script's docstring for each column.",
            "",
            *table,
        ]
    )
    print(body)
    print(f"\nruns under {work}")
    if args.results:
        write_section(args.results, "chaos", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
