"""Incremental precompute on S3 (moto): a rerun after images were added, changed and deleted
encodes only the affected units, reuses the other shards byte for byte, and the new dataset
holds exactly the current images."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from erw import storage
from erw.config import DataConfig
from erw.data.loader import build_loader
from erw.data.precompute import PrecomputeError, PrecomputeJob, claim_settings, plan_precompute, run_worker
from erw.data.shards import read_tar_samples, resolve_uri
from erw.data.sources import decode_image, open_source

CLASSES = ("ant", "bee", "cow")


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def job(source: str, out: str, cache: str, **kw) -> PrecomputeJob:
    settings = dict(resolution=16, codec="identity", batch_size=8, shard_size=4, io_threads=4)
    return PrecomputeJob(source=source, out=out, cache=cache, **{**settings, **kw})


def sha256(uri: str) -> str:
    return hashlib.sha256(storage.read_bytes(uri)).hexdigest()


def manifest_of(out: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(out, "manifest.json")))


def served_crops(out: str, num_samples: int) -> list[bytes]:
    """Every image the training loader serves in one epoch, as bytes of the uint8 crop."""
    cfg = DataConfig(shards=out, resolution=16, codec="identity", num_workers=0, shuffle_buffer=8)
    loader = iter(build_loader(cfg, batch_size=1, rank=0, world_size=1, seed=0, with_images=True))
    batches = [next(loader) for _ in range(num_samples)]
    assert {int(b["epoch"][0]) for b in batches} == {0}
    return sorted(b["image"][0].permute(1, 2, 0).numpy().tobytes() for b in batches)


def expected_crops(source: str, files: list[str]) -> list[bytes]:
    return sorted(decode_image(storage.read_bytes(storage.join(source, f)), 16).tobytes() for f in files)


def test_rerun_encodes_only_changed_units_and_lists_exactly_the_current_data(s3_bucket):
    source, cache = f"{s3_bucket}/images", f"{s3_bucket}/latents/identity-16px"
    files = {f"{c}/{i:03d}.png": 10 * k + i for k, c in enumerate(CLASSES) for i in range(16)}  # 48 images
    for name, seed in files.items():
        storage.write_bytes(storage.join(source, name), png(seed))

    v1 = f"{s3_bucket}/datasets/v1"
    first = run_worker(job(source, v1, cache), progress=False)
    before = manifest_of(v1)
    units_v1 = open_source(source, 4).units
    assert first.shards_written == len(units_v1) >= 8 and first.shards_skipped == 0
    assert before["num_samples"] == 48
    assert {s["unit"] for s in before["shards"]} == {u.key for u in units_v1}
    # the dataset lives apart from the unit store it shares with other datasets
    assert all(s["name"].startswith("../../latents/identity-16px/units/") for s in before["shards"])

    # Add three images, change one, delete one.
    added = ["ant/100.png", "bee/100.png", "cow/100.png"]
    for j, name in enumerate(added):
        storage.write_bytes(storage.join(source, name), png(1000 + j))
    changed, deleted = "bee/003.png", "cow/007.png"
    storage.write_bytes(storage.join(source, changed), png(2000))
    import boto3

    bucket = s3_bucket[len("s3://") :]
    boto3.client("s3").delete_object(Bucket=bucket, Key=f"images/{deleted}")
    current = sorted(set(files) - {deleted} | set(added))
    touched = {*added, changed, deleted}

    units_v2 = open_source(source, 4).units
    new_units = [u for u in units_v2 if u.key not in {u1.key for u1 in units_v1}]
    # Locality: the new units hold the added files and the rest of the few old units that the
    # changes touched (a new file can split its chunk, a deleted one merge two); the others stay.
    dropped = [u for u in units_v1 if u.key not in {u2.key for u2 in units_v2}]
    assert {f for u in new_units for f, _ in u.files} == {f for u in dropped for f, _ in u.files} - {deleted} | set(
        added
    )
    assert 1 <= len(new_units) <= 2 * len(touched) < len(units_v2)

    plan = plan_precompute(job(source, f"{s3_bucket}/datasets/v2", cache))
    assert (plan.units_total, plan.units_reused, plan.units_to_encode) == (
        len(units_v2),
        len(units_v2) - len(new_units),
        len(new_units),
    )

    v2 = f"{s3_bucket}/datasets/v2"
    second = run_worker(job(source, v2, cache), progress=False)
    assert (second.shards_written, second.shards_skipped) == (len(new_units), len(units_v2) - len(new_units))
    assert second.images == sum(u.size for u in new_units)  # only the affected units' images were encoded

    after = manifest_of(v2)
    assert [s["unit"] for s in after["shards"]] == [u.key for u in units_v2]  # exactly the current units
    assert after["num_samples"] == len(current) == 50
    names = sorted(s["src.txt"].decode() for e in after["shards"] for s in read_tar_samples(resolve_uri(v2, e["name"])))
    assert names == current and deleted not in names

    # Reused shards are the very same bytes; every listed shard matches its hash.
    by_unit = {s["unit"]: s for s in before["shards"]}
    reused = [s for s in after["shards"] if s["unit"] in by_unit]
    assert len(reused) == len(units_v2) - len(new_units)
    for entry in after["shards"]:
        assert sha256(resolve_uri(v2, entry["name"])) == entry["sha256"]
    for entry in reused:
        assert entry["sha256"] == by_unit[entry["unit"]]["sha256"] and entry["name"] == by_unit[entry["unit"]]["name"]

    # The training loader serves exactly the current images (the changed one in its new version).
    assert served_crops(v2, 50) == expected_crops(source, current)
    assert served_crops(v1, 48) == sorted(  # the old dataset is still intact for the runs that used it
        decode_image(png(seed), 16).tobytes() for seed in files.values()
    )

    # Rerun over the same source into the first dataset: all reused, manifest now current.
    third = run_worker(job(source, v1, cache), progress=False)
    assert (third.shards_written, third.shards_skipped) == (0, len(units_v2))
    assert [s["sha256"] for s in manifest_of(v1)["shards"]] == [s["sha256"] for s in after["shards"]]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_workers_with_other_settings_race_and_exactly_one_wins(where, tmp_path, request):
    """D7: the settings claim is a conditional create, so racing workers cannot both pass."""
    root = request.getfixturevalue("s3_bucket") if where == "s3" else str(tmp_path)
    for trial in range(10):
        cache = storage.join(root, f"cache{trial}")
        start = threading.Barrier(4)

        def claim(resolution: int, cache: str = cache, start: threading.Barrier = start) -> str:
            settings = job("unused", cache, cache, resolution=resolution).settings()
            start.wait()
            try:
                claim_settings(cache, settings)
                return f"claimed {resolution}"
            except PrecomputeError as err:
                return f"refused {resolution}: {err}"

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(claim, [16, 32, 16, 32]))
        winner = json.loads(storage.read_bytes(storage.join(cache, "precompute.json")))["resolution"]
        loser = 48 - winner
        assert sorted(results)[:2] == [f"claimed {winner}"] * 2, results
        assert all(
            r.startswith(f"refused {loser}:") and f"resolution: {winner} there, {loser} now" in r
            for r in results
            if not r.startswith("claimed")
        ), results


def test_sigterm_removes_the_partial_shard_and_sigkill_leftovers_go_next_start(tmp_path, digits_folder):
    """R4: a terminated precompute leaves no temp folder; a killed one's is removed by the next."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [
        sys.executable,
        "-m",
        "erw.cli",
        "precompute",
        "--no-progress",
        f"data.source={digits_folder}",
        f"data.shards={tmp_path / 'out'}",
        "data.resolution=32",
        "data.codec=identity",
        "precompute.shard_size=300",
        "precompute.batch_size=8",
    ]

    def start_and_wait_for_a_partial_shard() -> subprocess.Popen:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while not any(p.stat().st_size > 0 for p in tmp.glob("erw-precompute-*/*.tar")):
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
            time.sleep(0.05)
        return process

    process = start_and_wait_for_a_partial_shard()
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 143, output
    assert "partial shard is removed" in output
    assert not list(tmp.glob("erw-precompute-*"))

    process = start_and_wait_for_a_partial_shard()
    process.kill()
    process.wait(timeout=60)
    leftovers = list(tmp.glob("erw-precompute-*"))
    assert leftovers  # SIGKILL cannot be caught
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert not any(p.exists() for p in leftovers)


def test_the_evaluation_reads_a_dataset_that_shares_a_unit_store(s3_bucket):
    """Image sets (references, fit-encoder/evaluator inputs) resolve the manifest's relative
    shard names the way the loader does, on S3 too ("../" is not part of an S3 key)."""
    from erw.data.image_sets import open_image_set

    source, cache, out = f"{s3_bucket}/images", f"{s3_bucket}/latents/identity-16px", f"{s3_bucket}/datasets/v1"
    files = {f"{c}/{i:03d}.png": 10 * k + i for k, c in enumerate(CLASSES) for i in range(4)}
    for name, seed in files.items():
        storage.write_bytes(storage.join(source, name), png(seed))
    run_worker(job(source, out, cache, image_format="png"), progress=False)
    images, labels = zip(*open_image_set(out).batches(64))
    assert sum(len(x) for x in images) == len(files)
    got = sorted(x.permute(1, 2, 0).numpy().tobytes() for batch in images for x in batch)
    assert got == expected_crops(source, list(files))
