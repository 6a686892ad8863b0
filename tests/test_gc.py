"""`erw gc` on local disk and on S3 (moto server): --dry-run lists exactly what --apply deletes, and nothing
referenced is deleted."""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
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


def checkpoint(out: str, step: int, dataset: str, init_from: str, phase: str = "train") -> str:
    cfg = config_from_dict({"data": {"shards": dataset, "resolution": 16, "codec": "identity"}})
    state = {"w": torch.zeros(2)}
    return save_checkpoint(
        out,
        step=step,
        phase=phase,
        config=cfg,
        model_state=state,
        ema_state=state,
        train_state={},
        extra_meta={"init_from": init_from},
    )


class Workspace:
    """A workspace on local disk or in a bucket of the test S3 endpoint (moto server), with the
    two things a test needs beyond erw.storage: every file in it, and making files look old."""

    def __init__(self, uri: str):
        self.uri = uri

    def join(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    def files(self) -> set[str]:
        return {self.join(f.path) for f in storage.list_files(self.uri)}

    def age(self, under: str, when: float) -> None:
        """Give every file under the folder `under` (relative) the modification time `when`."""
        if storage.is_s3(self.uri):
            # S3 has no call that sets LastModified: set it in the endpoint's own store, as
            # os.utime does on disk. gc still reads it through a real ListObjectsV2.
            from moto.core import DEFAULT_ACCOUNT_ID
            from moto.s3.models import s3_backends

            bucket, key = storage.split_s3(self.join(under))
            stamp = datetime.datetime.fromtimestamp(when, datetime.timezone.utc).replace(tzinfo=None)
            prefix = key.rstrip("/") + "/" if key else ""
            store = s3_backends[DEFAULT_ACCOUNT_ID]["global"].get_bucket(bucket).keys
            for name, obj in store.items():
                if name.startswith(prefix):
                    obj.last_modified = stamp
            return
        for p in Path(self.uri, under).rglob("*"):
            if p.is_file():
                os.utime(p, (when, when))


@pytest.fixture(params=["local", "s3"])
def workspace(request, tmp_path) -> Workspace:
    if request.param == "s3":
        return Workspace(storage.join(request.getfixturevalue("s3_bucket"), "erw", "ws"))
    return Workspace(str(tmp_path / "ws"))


def gc(capsys, ws: Workspace, *mode: str) -> list[str]:
    assert main(["gc", "--workspace", ws.uri, "--keep-runs", "1", *mode]) == 0
    out = capsys.readouterr().out
    return [line.split("\t")[0] for line in out.splitlines() if "\t" in line]


def read_json(uri: str) -> dict:
    return json.loads(storage.read_bytes(uri))


def test_retention_keeps_what_is_referenced_and_dry_run_matches_apply(workspace, tmp_path, capsys):
    ws = workspace
    source = tmp_path / "images"
    for c in ("a", "b"):
        for i in range(12):
            storage.write_bytes(str(source / c / f"{i:02d}.png"), png(100 * ord(c) + i))
    store = ws.join("latents", "identity-16px")

    def dataset(name: str) -> str:
        out = storage.join(store, "datasets", name)
        run_worker(
            PrecomputeJob(
                source=str(source), out=out, cache=store, resolution=16, codec="identity", shard_size=3, io_threads=2
            ),
            progress=False,
        )
        return out

    def units(d: str) -> set[str]:
        return {resolve_uri(d, s["name"]) for s in read_json(storage.join(d, "manifest.json"))["shards"]}

    d_a = dataset("a")  # what the published model trained on
    (source / "a" / "extra.png").write_bytes(png(999))
    d_b = dataset("b")  # one more image: its units are the only ones d_b does not share
    (source / "a" / "extra.png").unlink()
    (source / "b" / "more.png").write_bytes(png(998))
    d_c = dataset("c")

    warm = {w: checkpoint(ws.join("warmup", w), 5, d_a, "", phase="warmup") for w in ("w1", "w2", "w3")}
    # r4 continued from r0's model (continue mode): r0 stays as long as r4 does.
    runs = {
        "r0": (d_a, warm["w1"]),
        "r1": (d_a, warm["w1"]),
        "r2": (d_b, warm["w1"]),
        "r3": (d_b, warm["w2"]),
        "r4": (d_c, "r0"),
    }
    finals = {}
    for run, (data, init) in runs.items():
        for step in (10, 20):
            finals[run] = checkpoint(ws.join("train", run), step, data, finals.get(init, init))
        storage.write_bytes(ws.join("eval", run, "metrics.json"), json.dumps({"fid": 10.0}).encode())
    promote_if_better(finals["r1"], ws.join("eval", "r1", "metrics.json"), ws.join("registry.json"), run_id="r1")

    ws.age("", OLD)
    for i, run in enumerate(("r1", "r2", "r3", "r4")):  # r4 is the newest run
        ws.age(f"train/{run}", OLD + i)
    ws.age("train/r3", time.time())  # r3 is still running

    before = ws.files()
    listed = gc(capsys, ws, "--dry-run")
    assert ws.files() == before  # a dry run deletes nothing
    assert listed == sorted(listed) and len(set(listed)) == len(listed)
    relative = [u[len(ws.uri) + 1 :].split("/") for u in listed]
    assert {parts[1] for parts in relative if parts[0] in ("train", "eval")} == {"r2"}
    applied = gc(capsys, ws, "--apply")
    assert applied == listed
    assert before - ws.files() == set(listed)  # exactly what the dry run listed

    # Kept: r4 (newest), r0 (r4 continued from it), r1 (published), r3 (running); the warmups they
    # used; their datasets' shards.
    for run in ("r0", "r1", "r3", "r4"):
        assert storage.exists(storage.join(finals[run], "meta.json")) and storage.exists(
            ws.join("eval", run, "metrics.json")
        )
    assert not storage.exists(ws.join("train", "r2")) and not storage.exists(ws.join("eval", "r2"))
    assert storage.exists(storage.join(warm["w1"], "meta.json")) and storage.exists(
        storage.join(warm["w2"], "meta.json")
    )
    assert not storage.exists(warm["w3"])  # no kept run started from it
    assert storage.exists(ws.join("registry.json"))
    for d in (d_a, d_b, d_c):  # d_b: r3 is running on it
        for shard in read_json(storage.join(d, "manifest.json"))["shards"]:
            assert hashlib.sha256(storage.read_bytes(resolve_uri(d, shard["name"]))).hexdigest() == shard["sha256"]

    # r3 finishes and ages: now r2's and r3's dataset d_b goes, but only the units nobody else lists.
    ws.age("train/r3", OLD + 2)
    units_b = units(d_b)
    before = ws.files()
    listed = gc(capsys, ws, "--dry-run")
    assert gc(capsys, ws, "--apply") == listed and before - ws.files() == set(listed)
    assert not storage.exists(ws.join("train", "r3"))
    assert not storage.exists(storage.join(d_b, "manifest.json"))
    kept_units = units(d_a) | units(d_c)
    deleted_units = {u for u in listed if u.endswith(".tar")}
    assert deleted_units == units_b - kept_units and deleted_units  # only d_b's own units went
    assert all(storage.exists(u) for u in kept_units)
    assert storage.exists(storage.join(store, "precompute.json"))


def test_s3_listing_pages_and_prefixes(s3_bucket, capsys):
    """On S3 gc sees every page of a listing (1,000 keys each) and only its own workspace's areas:
    not a sibling workspace whose name starts the same, not a folder named like an area plus a suffix."""
    from concurrent.futures import ThreadPoolExecutor

    ws = Workspace(storage.join(s3_bucket, "erw", "ws"))
    stale = [ws.join("latents", "old-store", "units", f"{i:04d}.{ext}") for i in range(501) for ext in ("tar", "json")]
    outside = [
        storage.join(s3_bucket, "erw", "ws2", "latents", "x.tar"),
        ws.join("latents-backup", "x.tar"),
        ws.join("trainer", "r0", "x"),
        ws.join("registry.json.bak"),
    ]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda uri: storage.write_bytes(uri, b"x"), stale + outside))
    Workspace(s3_bucket).age("", OLD)

    for mode, verb in (("--dry-run", "would delete"), ("--apply", "deleted")):
        assert main(["gc", "--workspace", ws.uri + "/", "--keep-runs", "1", mode]) == 0
        out = capsys.readouterr().out
        assert [line.split("\t")[0] for line in out.splitlines() if "\t" in line] == sorted(stale)
        assert f"gc: {verb} {len(stale)} files; kept runs: none" in out
    assert {storage.join(s3_bucket, f.path) for f in storage.list_files(s3_bucket)} == set(outside)
