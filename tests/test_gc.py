"""`erw gc`: --dry-run lists exactly what --apply deletes, and nothing referenced is deleted."""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from erw import storage
from erw.cli import main
from erw.config import config_from_dict
from erw.data.precompute import PrecomputeJob, run_worker
from erw.data.shards import resolve_uri
from erw.promote import promote_if_better
from erw.training.checkpoint import save_checkpoint

OLD = time.time() - 10 * 24 * 3600  # older than the grace period


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def checkpoint(out: Path, step: int, dataset: str, init_from: str, phase: str = "train") -> str:
    cfg = config_from_dict({"data": {"shards": dataset, "resolution": 16, "codec": "identity"}})
    state = {"w": torch.zeros(2)}
    return save_checkpoint(str(out), step=step, phase=phase, config=cfg, model_state=state, ema_state=state,
                           train_state={}, extra_meta={"init_from": init_from})


def every_file(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if p.is_file()}


def age(paths, when: float) -> None:
    for p in paths:
        os.utime(p, (when, when))


def gc(capsys, ws: Path, *mode: str) -> list[str]:
    assert main(["gc", "--workspace", str(ws), "--keep-runs", "1", *mode]) == 0
    out = capsys.readouterr().out
    return [line.split("\t")[0] for line in out.splitlines() if "\t" in line]


def test_retention_keeps_what_is_referenced_and_dry_run_matches_apply(tmp_path, capsys):
    ws = tmp_path / "ws"
    source = tmp_path / "images"
    for c in ("a", "b"):
        for i in range(12):
            storage.write_bytes(str(source / c / f"{i:02d}.png"), png(100 * ord(c) + i))
    store = ws / "latents" / "identity-16px"

    def dataset(name: str) -> str:
        out = str(store / "datasets" / name)
        run_worker(PrecomputeJob(source=str(source), out=out, cache=str(store), resolution=16, codec="identity",
                                 shard_size=3, io_threads=2), progress=False)
        return out

    d_a = dataset("a")  # what the published model trained on
    (source / "a" / "extra.png").write_bytes(png(999))
    d_b = dataset("b")  # one more image: its units are the only ones d_b does not share
    (source / "a" / "extra.png").unlink()
    (source / "b" / "more.png").write_bytes(png(998))
    d_c = dataset("c")

    warm = {w: checkpoint(ws / "warmup" / w, 5, d_a, "", phase="warmup") for w in ("w1", "w2", "w3")}
    # r4 continued from r0's model (continue mode): r0 stays as long as r4 does.
    runs = {"r0": (d_a, warm["w1"]), "r1": (d_a, warm["w1"]), "r2": (d_b, warm["w1"]), "r3": (d_b, warm["w2"]),
            "r4": (d_c, "r0")}
    finals = {}
    for run, (data, init) in runs.items():
        for step in (10, 20):
            finals[run] = checkpoint(ws / "train" / run, step, data, finals.get(init, init))
        storage.write_bytes(str(ws / "eval" / run / "metrics.json"), json.dumps({"fid": 10.0}).encode())
    promote_if_better(finals["r1"], str(ws / "eval" / "r1" / "metrics.json"), str(ws / "registry.json"), run_id="r1")

    age(every_file(ws), OLD)
    for i, run in enumerate(("r1", "r2", "r3", "r4")):  # r4 is the newest run
        age(every_file(ws / "train" / run), OLD + i)
    age(every_file(ws / "train" / "r3"), time.time())  # r3 is still running

    before = every_file(ws)
    listed = gc(capsys, ws, "--dry-run")
    assert every_file(ws) == before  # a dry run deletes nothing
    assert listed == sorted(listed) and len(set(listed)) == len(listed)
    assert {str(Path(u).relative_to(ws)).split("/")[0:2][1] for u in listed if "/train/" in u or "/eval/" in u} == {"r2"}
    applied = gc(capsys, ws, "--apply")
    assert applied == listed
    assert before - every_file(ws) == set(listed)  # exactly what the dry run listed

    # Kept: r4 (newest), r0 (r4 continued from it), r1 (published), r3 (running); the warmups they
    # used; their datasets' shards.
    for run in ("r0", "r1", "r3", "r4"):
        assert Path(finals[run], "meta.json").exists() and (ws / "eval" / run / "metrics.json").exists()
    assert not (ws / "train" / "r2").exists() and not (ws / "eval" / "r2").exists()
    assert Path(warm["w1"], "meta.json").exists() and Path(warm["w2"], "meta.json").exists()
    assert not Path(warm["w3"]).exists()  # no kept run started from it
    for d in (d_a, d_b, d_c):  # d_b: r3 is running on it
        manifest = json.loads(Path(d, "manifest.json").read_text())
        for shard in manifest["shards"]:
            assert hashlib.sha256(Path(resolve_uri(d, shard["name"])).read_bytes()).hexdigest() == shard["sha256"]

    # r3 finishes and ages: now r2's and r3's dataset d_b goes, but only the units nobody else lists.
    age(every_file(ws / "train" / "r3"), OLD + 2)
    units_b = {resolve_uri(d_b, s["name"]) for s in json.loads(Path(d_b, "manifest.json").read_text())["shards"]}
    before = every_file(ws)
    listed = gc(capsys, ws, "--dry-run")
    assert gc(capsys, ws, "--apply") == listed and before - every_file(ws) == set(listed)
    assert not (ws / "train" / "r3").exists()
    assert not Path(d_b, "manifest.json").exists()
    kept_units = {resolve_uri(d, s["name"]) for d in (d_a, d_c)
                  for s in json.loads(Path(d, "manifest.json").read_text())["shards"]}
    deleted_units = {u for u in listed if u.endswith(".tar")}
    assert deleted_units == units_b - kept_units and deleted_units  # only d_b's own units went
    assert all(Path(u).exists() for u in kept_units)
    assert (store / "precompute.json").exists()
