import json
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
        str(out), step=step, phase="train", config=cfg, model_state=state, ema_state={k: v * 2 for k, v in state.items()},
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
