"""The chaos suite: real `erw train` processes (2 ranks under `erw torchrun`, CPU/gloo) meet the faults
of a cluster, injected by erw/faults.py and tests/s3proxy.py, and must end where an uninterrupted
run ends: the same weights bit for bit, every sample trained on exactly as often.

Marked `chaos`: excluded from the default run, `make test` runs it as its own step
(`pytest -m chaos`). bench/chaos.py runs the same scenarios and prints the table of docs/results.md.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.chaos.harness import (
    STEPS,
    compare_samples,
    effective,
    first_shard,
    identical,
    read_trace,
    run,
    schedule_s3_blips,
    steps_lost,
    train_command,
)

from erw import faults, storage
from erw.training import checkpoint as ckpt

pytestmark = pytest.mark.chaos


def committed(out) -> list[int]:
    return [step for step, _ in ckpt.list_checkpoints(str(out))]


def assert_like_uninterrupted(out: Path, outcome, trace_dir: Path, reference) -> None:
    """The final weights equal the uninterrupted run's, and so does every rank's sample sequence."""
    same, diff = identical(ckpt.step_uri(str(out), STEPS), reference.final)
    assert same, f"final weights differ from the uninterrupted run's by up to {diff}"
    samples = compare_samples(effective(read_trace(trace_dir), outcome.resumed_at()), effective(reference.trace, [0]))
    assert (samples.twice, samples.never, samples.same_order) == (0, 0, True), samples


def test_a_killed_rank_then_resume_auto_ends_bit_identical(chaos_shards, uninterrupted, tmp_path):
    """SIGKILL on rank 1 after step 5 (a lost node): the job fails (exit 1, not a hang); the next
    `--resume auto` continues from step 4 and ends as if nothing had happened."""
    trace = {faults.TRACE_ENV: str(tmp_path / "trace")}
    killed = run(train_command(str(chaos_shards), "out"), tmp_path, env={**trace, faults.KILL_ENV: "1:5"})
    assert killed.status == 1 and "rank 1 sends itself SIGKILL after step 5" in killed.output, killed.output
    assert committed(tmp_path / "out") == [2, 4]
    resumed = run(train_command(str(chaos_shards), "out"), tmp_path, env=trace)
    assert resumed.status == 0, resumed.output
    outcome = type(resumed)(0, killed.output + resumed.output, 0.0)
    assert outcome.resumed_at() == [0, 4]
    assert steps_lost(read_trace(tmp_path / "trace"), outcome.resumed_at()) == 1
    assert_like_uninterrupted(tmp_path / "out", outcome, tmp_path / "trace", uninterrupted)


@pytest.mark.parametrize("rank", [0, 1])
def test_restart_in_place_reforms_the_group_and_ends_bit_identical(chaos_shards, uninterrupted, tmp_path, rank):
    """R1: `erw torchrun --max-restarts 2` with a c10d rendezvous: a killed rank (rank 0 hosts the
    workers' store) brings the group down, torchrun starts it again, the new incarnation resumes
    from the last checkpoint and the job succeeds, bit-identical to the uninterrupted run."""
    trace = {faults.TRACE_ENV: str(tmp_path / "trace")}
    outcome = run(
        train_command(str(chaos_shards), "out", restarts=2),
        tmp_path,
        env={**trace, faults.KILL_ENV: f"{rank}:5"},
        timeout=300,
    )
    assert outcome.status == 0, outcome.output
    assert f"rank {rank} sends itself SIGKILL after step 5" in outcome.output
    assert outcome.resumed_at() == [0, 4], outcome.output
    assert_like_uninterrupted(tmp_path / "out", outcome, tmp_path / "trace", uninterrupted)


def test_sigterm_to_one_rank_is_a_preemption(chaos_shards, tmp_path):
    """SIGTERM reaching a single rank (a node drain): every rank checkpoints that step together and
    `erw torchrun` exits 143, which launchers and Volcano read as a preemption, not a failure."""
    outcome = run(train_command(str(chaos_shards), "out"), tmp_path, env={faults.KILL_ENV: "1:5:TERM"})
    assert outcome.status == 143, outcome.output
    assert "checkpointing at step 5" in outcome.output and "erw torchrun: preempted" in outcome.output
    assert committed(tmp_path / "out") == [2, 4, 5]


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(chaos_shards, uninterrupted, tmp_path):
    """R2: the newest checkpoint fails its checksum (a bad disk, a torn copy): `--resume auto` names
    it, skips it and continues from the one before, ending bit-identical."""
    shutil.copytree(uninterrupted.out, tmp_path / "out")
    for step in (8, 7):
        shutil.rmtree(tmp_path / f"out/step-{step:08d}", ignore_errors=True)
    model = tmp_path / "out/step-00000006" / ckpt.MODEL
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    outcome = run(train_command(str(chaos_shards), "out"), tmp_path)
    assert outcome.status == 0, outcome.output
    assert (
        "skipped" in outcome.output and "step-00000006/model.safetensors does not match the checksum" in outcome.output
    )
    assert outcome.resumed_at() == [4]
    assert identical(ckpt.step_uri(str(tmp_path / "out"), STEPS), uninterrupted.final)[0]


@pytest.mark.parametrize("where", ["disk", "s3"])
def test_killing_the_checkpoint_writer_never_leaves_a_broken_checkpoint_to_resume(
    chaos_shards, tmp_path, where, request
):
    """20 kill points inside the checkpoint writes (every file of two checkpoints at its first, middle
    and last byte; two as a full disk): `--resume auto` always loads a checkpoint that verifies and
    equals the uninterrupted run's of that step, never the torn one, and ends bit-identical."""
    out = str(tmp_path / "runs") if where == "disk" else request.getfixturevalue("s3_bucket") + "/runs"
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parent / "killpoints.py"),
            "--shards",
            str(chaos_shards),
            "--out",
            out,
            "--work",
            str(tmp_path / "work"),
            "--report",
            str(report),
            "--points",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    points = json.loads(report.read_text())
    assert len(points) == 20
    for point in points:
        # killed inside a checkpoint write, or failed there as a full disk: one message, exit status 2
        assert point["status"] in (-9, 2) and point["cut"], point
        newest = max(point["committed"], default=None)
        assert point["resume_auto_loads"] == newest and point["error"] == "", point
        assert point["loaded_equals_uninterrupted"] in (True, None), point
        assert point["resumed_status"] == 0 and point["final_identical"], point
    assert sum(p["status"] == -9 for p in points) == 18
    for point in (p for p in points if p["budget"].endswith(":raise")):
        log = (tmp_path / "work" / f"{points.index(point):02d}-killed.log").read_text()
        assert point["status"] == 2 and "Traceback" not in log and "ENOSPC No space left on device" in log, log
    assert {p["cut"].split("/")[0] for p in points} == {"step-00000002", "step-00000004"}


def _upload(folder: Path, uri: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            storage.write_bytes(storage.join(uri, path.relative_to(folder).as_posix()), path.read_bytes())


def test_s3_faults_during_training_are_ridden_out(
    chaos_shards, uninterrupted, s3_bucket, s3_proxy, monkeypatch, tmp_path
):
    """Shards and checkpoints on S3 behind the fault proxy: 5xx and SlowDown answers, connection
    resets, a stalled read and a 5 s outage during a checkpoint write. The run survives, bit-identical
    to the uninterrupted run on local disk."""
    monkeypatch.setenv("ERW_S3_STALL_SECONDS", "2")
    s3_proxy.clear()
    _upload(chaos_shards, f"{s3_bucket}/shards")
    on_line = schedule_s3_blips(s3_proxy)

    outcome = run(train_command(f"{s3_bucket}/shards", f"{s3_bucket}/out"), tmp_path, on_line=on_line)
    injected = dict(s3_proxy.injected)
    s3_proxy.clear()
    assert outcome.status == 0, outcome.output
    assert injected.get("fail") == 6 and injected.get("reset") == 3 and injected.get("stall") == 1, injected
    assert injected.get("outage", 0) >= 1, injected
    assert identical(ckpt.step_uri(f"{s3_bucket}/out", STEPS), uninterrupted.final)[0]


@pytest.mark.parametrize("mode", ["truncate", "flip"])
def test_a_corrupt_shard_is_reported_not_a_hang(chaos_shards, tmp_path, mode):
    """A shard that reads short or as garbage halfway: the run stops with one line that names it
    (exit 2), instead of a traceback, a hang, or training on garbage."""
    name = first_shard(chaos_shards)
    outcome = run(
        train_command(str(chaos_shards), "out", ranks=1),
        tmp_path,
        env={faults.CORRUPT_SHARD_ENV: f"{name}:{mode}"},
        timeout=120,
    )
    assert outcome.status == 2, outcome.output
    assert name in outcome.output.splitlines()[-1] and "Traceback" not in outcome.output, outcome.output
