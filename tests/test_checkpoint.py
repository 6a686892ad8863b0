import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from erw.config import load_config
from erw.training import checkpoint as ckpt

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _save(out, step, value=1.0):
    cfg = load_config(CONFIGS / "demo.yaml")
    state = {"w": torch.full((3, 2), value), "b": torch.arange(4.0)}
    return ckpt.save_checkpoint(
        str(out),
        step=step,
        phase="train",
        config=cfg,
        model_state=state,
        ema_state={k: v * 2 for k, v in state.items()},
        train_state={"step": step, "optimizer": {"state": {}, "param_groups": []}, "data": {"epoch": 1}},
    )


def test_round_trip(tmp_path):
    uri = _save(tmp_path, 10, value=3.0)
    loaded = ckpt.load_checkpoint(uri)
    assert loaded.step == 10 and loaded.phase == "train"
    assert torch.equal(loaded.model_state["w"], torch.full((3, 2), 3.0))
    assert torch.equal(loaded.ema_state["b"], torch.arange(4.0) * 2)
    assert loaded.train_state["data"] == {"epoch": 1}
    assert loaded.config() == load_config(CONFIGS / "demo.yaml")


def test_latest_skips_uncommitted_and_prune_keeps_newest(tmp_path):
    for step in (10, 20, 30):
        _save(tmp_path, step)
    (tmp_path / "step-00000040").mkdir()  # a write that never got its meta.json
    (tmp_path / "step-00000040" / "model.safetensors").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("step-00000030")
    assert ckpt.resolve_checkpoint(str(tmp_path)).endswith("step-00000030")
    ckpt.prune_checkpoints(str(tmp_path), keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [20, 30]
    # The newer unfinished write may belong to a save in progress: it is left alone.
    assert (tmp_path / "step-00000040").exists()


def test_partial_checkpoint_is_refused(tmp_path):
    uri = Path(_save(tmp_path, 5))
    (uri / "meta.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="incomplete checkpoint"):
        ckpt.load_checkpoint(str(uri))
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        ckpt.load_checkpoint(str(tmp_path / "elsewhere"))


@pytest.mark.parametrize("name", ["model.safetensors", "ema.safetensors", "state.pt"])
def test_corrupt_file_is_refused_not_half_loaded(tmp_path, name):
    uri = Path(_save(tmp_path, 5))
    data = bytearray((uri / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (uri / name).write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=f"{name} does not match the checksum"):
        ckpt.load_checkpoint(str(uri))


def test_missing_file_and_bad_meta_are_refused(tmp_path):
    uri = Path(_save(tmp_path, 5))
    (uri / "ema.safetensors").unlink()
    with pytest.raises(ckpt.CheckpointError, match="missing ema.safetensors"):
        ckpt.load_checkpoint(str(uri))
    (uri / "meta.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="not valid JSON"):
        ckpt.load_checkpoint(str(uri))


def test_pickled_objects_are_never_loaded(tmp_path):
    """state.pt is read with weights_only=True: a crafted pickle cannot run code."""
    uri = Path(_save(tmp_path, 5))
    import hashlib
    import io

    buf = io.BytesIO()
    torch.save({"evil": Path("/")}, buf)  # an arbitrary (non-tensor) object
    (uri / "state.pt").write_bytes(buf.getvalue())
    meta = json.loads((uri / "meta.json").read_text())
    meta["files"]["state.pt"] = hashlib.sha256(buf.getvalue()).hexdigest()
    (uri / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match="cannot be read"):
        ckpt.load_checkpoint(str(uri))


def test_prune_never_deletes_the_checkpoint_it_just_wrote(tmp_path):
    for step in (10, 20, 30):
        _save(tmp_path, step)
    mine = _save(tmp_path, 5)  # a lower step than what the directory holds
    ckpt.prune_checkpoints(str(tmp_path), keep_last=2, keep=mine)
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [5, 20, 30]


def test_latest_verified_skips_corrupt_checkpoints_and_says_why(tmp_path):
    for step in (10, 20, 30):
        _save(tmp_path, step, value=float(step))
    (tmp_path / "step-00000030" / "state.pt").write_bytes(b"truncated")
    (tmp_path / "step-00000020" / "meta.json").write_text("{not json")
    loaded, skipped = ckpt.load_latest_verified(str(tmp_path))
    assert loaded.step == 10 and torch.equal(loaded.model_state["w"], torch.full((3, 2), 10.0))
    assert len(skipped) == 2 and "step-00000030" in skipped[0] and "state.pt does not match the checksum" in skipped[0]
    assert "step-00000020" in skipped[1] and "not valid JSON" in skipped[1]
    (tmp_path / "step-00000010" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint under .* verifies"):
        ckpt.load_latest_verified(str(tmp_path))
    assert ckpt.load_latest_verified(str(tmp_path / "empty")) == (None, [])


# ---------------------------------------------------------------------------------------------
# Asynchronous checkpoints (erw/training/async_checkpoint.py) through the real training loop.


TESTS = Path(__file__).resolve().parent


def _train(out, *overrides, batches=None, **kwargs):
    from tests.test_trainer import CPU, Batches, tiny_config

    from erw.training.trainer import run

    cfg = tiny_config(
        out, "encoder.name=none", "train.ckpt_every=2", "train.keep_last=10", "train.ema_decay=0.9", *overrides
    )
    return run(cfg, "train", batches or Batches(), CPU, **kwargs)


def test_an_asynchronous_checkpoint_is_identical_to_a_synchronous_one(tmp_path):
    _train(tmp_path / "sync", "train.steps=6", "train.async_checkpoint=false")
    _train(tmp_path / "async", "train.steps=6", "train.async_checkpoint=true")
    for step in (2, 4, 6):
        a, b = tmp_path / f"sync/train/step-{step:08d}", tmp_path / f"async/train/step-{step:08d}"
        for name in ("model.safetensors", "ema.safetensors", "state.pt"):
            assert (a / name).read_bytes() == (b / name).read_bytes(), f"step {step} {name}"
        meta_a, meta_b = (json.loads((d / "meta.json").read_text()) for d in (a, b))
        assert meta_a["files"] == meta_b["files"]


KILLED_MID_WRITE = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from erw import storage
from tests.test_checkpoint import _train

victim, cut = sys.argv[3], sys.argv[4]
real_write = storage.write_bytes

def dying_write(uri, data):
    # The write of step 4's `victim` file is where the process dies (SIGKILL: no cleanup at all).
    if uri.endswith("step-00000004/" + victim):
        if cut == "half":
            real_write(uri, data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    real_write(uri, data)

storage.write_bytes = dying_write
_train(sys.argv[2], "train.steps=6", "train.async_checkpoint=true")
"""


@pytest.mark.parametrize(
    "victim, cut",
    [("model.safetensors", "half"), ("ema.safetensors", "before"), ("state.pt", "half"), ("meta.json", "before")],
)
def test_a_kill_during_an_asynchronous_write_never_commits_a_broken_checkpoint(tmp_path, victim, cut):
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_MID_WRITE, str(TESTS.parent), str(tmp_path / "b"), victim, cut],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    out = str(tmp_path / "b/train")
    assert (tmp_path / "b/train/step-00000004").exists()  # the write had started
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]  # and was never committed
    assert ckpt.load_latest_verified(out)[0].step == 2
    resumed = _train(tmp_path / "b", "train.steps=6", resume="auto")
    straight = _train(tmp_path / "a", "train.steps=6")
    a, b = ckpt.load_checkpoint(straight.checkpoint), ckpt.load_checkpoint(resumed.checkpoint)
    assert all(torch.equal(b.model_state[k], v) for k, v in a.model_state.items())


class SignalAt:
    """The test batches, sending this process SIGTERM when batch `at` is drawn (a preemption)."""

    def __init__(self, at):
        from tests.test_trainer import Batches

        self.batches, self.at = Batches(), at

    def __iter__(self):
        for batch in self.batches:
            if self.batches.position == self.at:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    def state_dict(self):
        return self.batches.state_dict()

    def load_state_dict(self, state):
        self.batches.load_state_dict(state)


def test_sigterm_writes_what_fits_in_the_grace_period_and_says_so(tmp_path):
    said = []
    result = _train(
        tmp_path / "fits", "train.steps=100", "train.async_checkpoint=true", batches=SignalAt(3), log=said.append
    )
    assert result.preempted and result.step == 3 and result.checkpoint.endswith("step-00000003")
    assert any("checkpointed step 3 in" in line and "grace period 25s" in line for line in said)
    # No time left: the last write took longer than the 0 s that remain, so none is started.
    said = []
    result = _train(
        tmp_path / "late",
        "train.steps=100",
        "train.grace_period_s=0",
        "train.async_checkpoint=false",
        batches=SignalAt(3),
        log=said.append,
    )
    assert result.preempted and result.checkpoint.endswith("step-00000002")
    assert any("no checkpoint of step 3" in line and "resume will start from" in line for line in said), said
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path / "late/train"))] == [2]


# ---------------------------------------------------------------------------------------------
# A full disk during a checkpoint write (ERW_FAULT_CKPT_BYTES=N:raise): one clear error, no torn files.


@pytest.fixture
def full_disk_after(monkeypatch):
    """full_disk_after(n): the checkpoint writer fails as a full disk once n bytes are written."""
    from erw import faults

    def arm(n: int) -> None:
        monkeypatch.setenv(faults.CKPT_BYTES_ENV, f"{n}:raise")
        faults.configure()

    yield arm
    monkeypatch.delenv(faults.CKPT_BYTES_ENV, raising=False)
    faults.configure()


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_full_disk_during_a_checkpoint_is_one_clear_error_and_leaves_no_torn_files(
    tmp_path, full_disk_after, asynchronous
):
    from erw.errors import ErwError

    _train(tmp_path / "sizes", "train.steps=2")
    one = sum(f.stat().st_size for f in (tmp_path / "sizes/train/step-00000002").iterdir())
    full_disk_after(one + 1000)  # step 2 commits; step 4 runs out of space 1000 bytes into its first file
    flag = f"train.async_checkpoint={str(asynchronous).lower()}"
    with pytest.raises(ErwError) as failed:  # one message for the user, not an OSError traceback
        _train(tmp_path / "run", "train.steps=6", flag)
    message, out = str(failed.value), tmp_path / "run/train"
    assert f"cannot write checkpoint {out}/step-00000004: ENOSPC No space left on device" in message
    assert f"({out}/step-00000004/model.safetensors)" in message  # the file that failed
    assert f"Free space under {out}, or set train.out to a location with room" in message
    assert f"The previous checkpoint {out}/step-00000002 is intact: `--resume auto` continues from it" in message
    # The torn step-4 write (its temp file) is gone: only the committed checkpoint remains.
    assert sorted(p.name for p in out.iterdir()) == ["step-00000002"]
    assert not list(out.rglob(".*tmp*"))
    # And --resume auto continues from it, to the same weights as an uninterrupted run.
    full_disk_after(10**12)
    resumed = _train(tmp_path / "run", "train.steps=6", flag, resume="auto")
    straight = _train(tmp_path / "sizes", "train.steps=6", resume="auto")
    a, b = ckpt.load_checkpoint(straight.checkpoint), ckpt.load_checkpoint(resumed.checkpoint)
    assert resumed.step == 6 and all(torch.equal(b.model_state[k], v) for k, v in a.model_state.items())


def test_a_real_full_disk_write_removes_its_temp_file(tmp_path, monkeypatch):
    """storage.write_bytes itself (not the injector): the OSError of the write leaves no temp file."""
    import errno
    from pathlib import Path as _Path

    from erw import storage

    real = _Path.write_bytes

    def full(self, data):
        real(self, data[:10])  # what the disk took before it filled up
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(_Path, "write_bytes", full)
    with pytest.raises(OSError, match="No space left"):
        storage.write_bytes(str(tmp_path / "a/model.safetensors"), b"x" * 100)
    assert list((tmp_path / "a").iterdir()) == []


def test_a_full_disk_under_erw_train_exits_2_with_one_message(tmp_path, monkeypatch):
    """The same through the command line: exit status 2, the message, no traceback."""
    from erw import faults
    from tests.images import noise_image_folder
    from tests.test_cli_training import ROOT, TINY, erw

    noise_image_folder(tmp_path / "images", count=32, classes=2, size=16)
    erw(
        "precompute",
        "--no-progress",
        "data.source=images",
        "data.shards=shards",
        "data.resolution=16",
        "data.codec=identity",
        cwd=tmp_path,
    )
    monkeypatch.setenv(faults.CKPT_BYTES_ENV, "1000:raise")  # the first checkpoint, 1000 bytes into its first file
    failed = erw(
        "train",
        "--config",
        str(ROOT / "configs/demo.yaml"),
        "data.shards=shards",
        *TINY,
        "encoder.name=none",
        "data.num_workers=0",
        "train.steps=2",
        "train.ckpt_every=1",
        "train.out=full",
        cwd=tmp_path,
        check=False,
    )
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
    assert (
        "erw train: error: cannot write checkpoint full/step-00000001: ENOSPC No space left on device" in failed.stderr
    )
    assert "No checkpoint of this run was committed before: a rerun starts from step 0" in failed.stderr
    assert list((tmp_path / "full").iterdir()) == []
