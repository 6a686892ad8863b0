"""The fault injector (erw/faults.py): off and free by default, and each fault fires exactly where asked."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from erw import faults
from erw.config import load_config
from erw.data.shards import read_tar_samples
from erw.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
CPU_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture
def armed(monkeypatch):
    """arm(**env): configure the injector from these variables; disarmed again after the test."""

    def arm(**env):
        for name in (faults.KILL_ENV, faults.CKPT_BYTES_ENV, faults.CORRUPT_SHARD_ENV):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        faults.configure()

    yield arm
    monkeypatch.undo()
    faults.configure()


def test_off_by_default_every_hook_is_a_no_op(armed, tmp_path):
    armed()
    assert faults.armed() == []
    assert faults.after_step is faults._no_step and faults.checkpoint_write is faults._no_write
    stream = io.BytesIO(b"abc")
    assert faults.shard_stream("shard-000000.tar", stream) is stream  # not even wrapped
    faults.after_step(0, 1)
    faults.checkpoint_write(str(tmp_path / "model.safetensors"), b"x" * 100)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "name, value, message",
    [
        (faults.KILL_ENV, "1", "expected RANK:STEP[:SIGNAL]"),
        (faults.KILL_ENV, "1:2:NOPE", "'NOPE' is not a signal"),
        (faults.CKPT_BYTES_ENV, "lots", "expected N[:kill|raise]"),
        (faults.CKPT_BYTES_ENV, "10:explode", "expected N[:kill|raise]"),
        (faults.CORRUPT_SHARD_ENV, "data/shard-000001.tar", "a shard's file name"),
    ],
)
def test_a_malformed_variable_is_a_clear_error(armed, name, value, message):
    with pytest.raises(faults.FaultConfigError, match=re.escape(message)):
        armed(**{name: value})


def test_parsing():
    assert faults.parse_kill("1:5") == faults.KillAt(1, 5, signal.SIGKILL)
    assert faults.parse_kill("0:12:TERM") == faults.KillAt(0, 12, signal.SIGTERM)
    assert faults.parse_kill("0:12:sigint").signal == signal.SIGINT
    assert faults.parse_kill("0:12:15").signal == signal.SIGTERM
    assert faults.parse_ckpt_bytes("4096") == faults.CheckpointBytes(4096, "kill")
    assert faults.parse_ckpt_bytes("0:raise") == faults.CheckpointBytes(0, "raise")
    assert faults.parse_corrupt_shard("shard-000003.tar:truncate") == faults.CorruptShard(
        "shard-000003.tar", "truncate"
    )


STEPS = """
from erw import faults
for step in range(1, 6):
    for rank in (0, 1):
        faults.after_step(rank, step)
        print(rank, step, flush=True)
"""


@pytest.mark.parametrize(
    "restart_count, expected_lines, expected_status",
    [
        ("", ["0 1", "1 1", "0 2", "1 2", "0 3"], -signal.SIGKILL),  # dies in rank 1's step 3, nowhere else
        ("0", ["0 1", "1 1", "0 2", "1 2", "0 3"], -signal.SIGKILL),
        ("1", [f"{r} {s}" for s in range(1, 6) for r in (0, 1)], 0),  # a restarted incarnation runs through
    ],
)
def test_kill_fires_at_that_rank_and_step_in_the_first_incarnation_only(restart_count, expected_lines, expected_status):
    env = {**CPU_ENV, faults.KILL_ENV: "1:3", faults.RESTART_COUNT_ENV: restart_count}
    proc = subprocess.run([sys.executable, "-c", STEPS], env=env, capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines() == expected_lines and proc.returncode == expected_status, proc.stderr
    if expected_status:
        assert "rank 1 sends itself SIGKILL after step 3" in proc.stderr


def test_the_trainer_calls_the_kill_hook_after_each_step(armed, tmp_path):
    """SIGTERM at rank 0, step 3, in this process: the trainer's own preemption path checkpoints step 3."""
    from tests.test_trainer import CPU, Batches, tiny_config

    from erw.training.trainer import run

    armed(**{faults.KILL_ENV: "0:3:TERM"})
    result = run(
        tiny_config(tmp_path, "train.steps=8", "train.ckpt_every=100", "encoder.name=none"),
        "train",
        Batches(),
        CPU,
        log=lambda _msg: None,
    )
    assert result.preempted and result.step == 3
    assert ckpt.load_checkpoint(str(tmp_path / "train")).step == 3


SAVE = """
import sys, torch
from erw.config import load_config
from erw.training import checkpoint as ckpt

cfg = load_config(sys.argv[1])
weights = {"w": torch.arange(1000, dtype=torch.float32)}
for step in (1, 2):
    ckpt.save_checkpoint(sys.argv[2], step=step, phase="train", config=cfg, model_state=weights,
                         ema_state=weights, train_state={"step": step})
    print("saved", step, flush=True)
"""


def _checkpoint_sizes(tmp_path) -> list[tuple[str, int]]:
    """(file, bytes) in the order the writer stores them, from a clean save without faults."""
    env = {k: v for k, v in CPU_ENV.items() if not k.startswith("ERW_FAULT_")}
    subprocess.run(
        [sys.executable, "-c", SAVE, str(ROOT / "configs/demo.yaml"), str(tmp_path / "clean")],
        env=env,
        check=True,
        timeout=120,
    )
    step = tmp_path / "clean/step-00000001"
    return [(name, (step / name).stat().st_size) for name in (ckpt.MODEL, ckpt.EMA, ckpt.STATE, ckpt.META)]


def _killed_save(tmp_path, budget: int) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / f"out-{budget}"
    env = {**CPU_ENV, faults.CKPT_BYTES_ENV: str(budget)}
    proc = subprocess.run(
        [sys.executable, "-c", SAVE, str(ROOT / "configs/demo.yaml"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return proc, out


def test_the_checkpoint_writer_is_killed_after_exactly_n_bytes(tmp_path):
    sizes = _checkpoint_sizes(tmp_path)
    model, ema = sizes[0][1], sizes[1][1]
    proc, out = _killed_save(tmp_path, model + 100)  # 100 bytes into the first checkpoint's EMA file
    assert (
        proc.stdout == "" and f"killed after 100 of {ema} bytes of {out}/step-00000001/ema.safetensors" in proc.stderr
    )
    torn = out / "step-00000001"
    leftovers = sorted(p.name for p in torn.iterdir())
    assert leftovers[0].startswith(".ema.safetensors.tmp-") and leftovers[1:] == [ckpt.MODEL]
    assert (torn / leftovers[0]).read_bytes() == (tmp_path / "clean/step-00000001/ema.safetensors").read_bytes()[:100]
    assert ckpt.list_checkpoints(str(out)) == []  # the torn write is not committed

    # The budget counts over every checkpoint of the process: past the first one, into the second.
    proc, out = _killed_save(tmp_path, sum(size for _, size in sizes) + 100)
    assert proc.stdout.splitlines() == ["saved 1"] and "/step-00000002/model.safetensors" in proc.stderr
    assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [1]


def test_the_checkpoint_writer_fails_like_a_full_disk(armed, tmp_path):
    armed(**{faults.CKPT_BYTES_ENV: "10:raise"})
    cfg = load_config(ROOT / "configs/demo.yaml")
    weights = {"w": torch.zeros(10)}
    with pytest.raises(OSError, match="No space left on device"):
        ckpt.save_checkpoint(
            str(tmp_path), step=1, phase="train", config=cfg, model_state=weights, ema_state=weights, train_state={}
        )
    assert ckpt.list_checkpoints(str(tmp_path)) == []


def _tar(path: Path, samples: int) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(samples):
            for suffix, data in (("cls", str(i % 10).encode()), ("latent.npy", bytes(range(256)) * 8)):
                info = tarfile.TarInfo(f"{i:06d}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_a_corrupted_shard_is_read_as_garbage_only_under_its_name(armed, tmp_path):
    _tar(tmp_path / "shard-000000.tar", 8)
    _tar(tmp_path / "shard-000001.tar", 8)
    armed(**{faults.CORRUPT_SHARD_ENV: "shard-000001.tar:truncate"})
    assert len(list(read_tar_samples(str(tmp_path / "shard-000000.tar")))) == 8
    assert 0 < len(list(read_tar_samples(str(tmp_path / "shard-000001.tar")))) < 8  # ends in the middle
    armed(**{faults.CORRUPT_SHARD_ENV: "shard-000001.tar"})  # flip
    flipped = list(read_tar_samples(str(tmp_path / "shard-000001.tar")))
    assert 0 < len(flipped) < 8  # tarfile reads a garbage header after the first member as the end
    raw = (tmp_path / "shard-000001.tar").read_bytes()
    with faults.shard_stream(str(tmp_path / "shard-000001.tar"), open(tmp_path / "shard-000001.tar", "rb")) as s:
        seen = s.read()
    half = len(raw) // 2
    assert seen[:half] == raw[:half] and seen[half:] == bytes(b ^ 0xFF for b in raw[half:])


def test_the_trace_records_each_batch_taken_and_closes_the_source(armed, tmp_path):
    closed = []

    def source():
        try:
            for i in range(5):
                yield {"index": torch.tensor([2 * i, 2 * i + 1]), "epoch": torch.tensor([0, 0])}
        finally:
            closed.append(True)

    armed(**{faults.TRACE_ENV: str(tmp_path / "trace")})
    traced = faults.batches(source(), 1)
    taken = [next(traced) for _ in range(3)]  # the DataLoader may hold more; only what is taken counts
    traced.close()
    lines = [json.loads(line) for line in (tmp_path / "trace/rank-1.jsonl").read_text().splitlines()]
    assert [line["index"] for line in lines] == [[0, 1], [2, 3], [4, 5]] == [b["index"].tolist() for b in taken]
    assert lines[0]["pid"] == os.getpid() and lines[0]["restart"] == 0 and closed == [True]
