"""The precompute job: sources, centre crop, shards + manifest on S3, kill and resume, merge."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from erw import cli
from erw import storage
from erw.data.precompute import PrecomputeError, PrecomputeJob, merge, run_worker
from erw.data.shards import ShardWriter, load_npy, read_tar_samples
from erw.data.sources import SourceError, center_crop_adm, decode_image, open_source

CLASSES = ("cat", "dog", "owl")


def image_bytes(seed: int, size=(40, 32), fmt="PNG") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def make_image_folder(root: str, per_class: int = 7) -> dict[str, int]:
    """ImageFolder with png and jpg images, a truncated jpg and a text file; returns good file -> label."""
    good = {}
    for label, name in enumerate(CLASSES):
        for i in range(per_class):
            fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
            path = f"{name}/{i:03d}.{ext}"
            storage.write_bytes(storage.join(root, path), image_bytes(100 * label + i, fmt=fmt))
            good[path] = label
    storage.write_bytes(storage.join(root, "dog/broken.jpg"), image_bytes(999, fmt="JPEG")[:300])
    storage.write_bytes(storage.join(root, "owl/notes.txt"), b"not an image")
    return good


def read_dataset(out: str) -> tuple[dict, list[dict]]:
    manifest = json.loads(storage.read_bytes(storage.join(out, "manifest.json")))
    samples = [s for shard in manifest["shards"] for s in read_tar_samples(storage.join(out, shard["name"]))]
    return manifest, samples


def job(source, out, **kw):
    defaults = dict(resolution=16, codec="identity", batch_size=4, shard_size=5, io_threads=4)
    return PrecomputeJob(source=source, out=out, **{**defaults, **kw})


def test_image_folder_on_s3_to_shards_on_s3(s3_bucket):
    source, out = f"{s3_bucket}/images/train", f"{s3_bucket}/latents/digits-16"
    good = make_image_folder(source)
    for worker in range(2):
        run_worker(job(source, out, worker_index=worker, num_workers=2), progress=False)
    manifest = merge(out, num_workers=2)
    assert manifest == json.loads(storage.read_bytes(f"{out}/manifest.json"))

    assert manifest["failures"]["count"] == 2
    assert {f["file"] for f in manifest["failures"]["files"]} == {"dog/broken.jpg", "owl/notes.txt"}
    assert all(f["reason"].startswith("not a readable image") for f in manifest["failures"]["files"])
    assert manifest["num_samples"] == len(good) == 21
    assert manifest["class_names"] == list(CLASSES) and manifest["class_counts"] == [7, 7, 7]
    assert manifest["codec"]["name"] == "identity" and manifest["latent_shape"] == [6, 16, 16]
    units = open_source(source, 5).units  # 23 files cut by content, about 5 per unit
    assert [s["unit"] for s in manifest["shards"]] == [u.key for u in units if any(f in good for f, _ in u.files)]
    assert all(1 <= u.size <= 15 for u in units) and sum(u.size for u in units) == 23
    assert sum(s["count"] for s in manifest["shards"]) == 21

    _, samples = read_dataset(out)
    names = [s["src.txt"].decode() for s in samples]
    assert sorted(names) == sorted(good)  # every good image exactly once
    assert len({s["__key__"] for s in samples}) == len(samples)
    for sample in samples:
        name = sample["src.txt"].decode()
        assert int(sample["cls"]) == good[name]
        crop = decode_image(storage.read_bytes(f"{source}/{name}"), 16)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), crop)
        moments = load_npy(sample["latent.npy"])
        assert moments.dtype == np.float16 and moments.shape == (6, 16, 16)
        np.testing.assert_allclose(moments[:3], crop.transpose(2, 0, 1) / 127.5 - 1, atol=1e-3)


def test_shard_checksums_and_latent_stats(tmp_path):
    source, out = str(tmp_path / "src"), str(tmp_path / "out")
    make_image_folder(source, per_class=3)
    run_worker(job(source, out), progress=False)
    manifest, samples = read_dataset(out)
    import hashlib

    for shard in manifest["shards"]:
        assert hashlib.sha256(Path(out, shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
    means = np.stack([load_npy(s["latent.npy"])[:3].astype(np.float64) for s in samples])
    np.testing.assert_allclose(manifest["latent_stats"]["mean"], means.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(manifest["latent_stats"]["std"], means.std(axis=(0, 2, 3)), rtol=1e-6)


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs, and no `except Exception` can swallow it."""


def test_killed_halfway_then_rerun(tmp_path, monkeypatch):
    source, out = str(tmp_path / "src"), str(tmp_path / "out")
    good = make_image_folder(source)
    units = open_source(source, 5).units
    die_at = units[0].size + units[1].size + 1  # in the third unit
    real_write = ShardWriter.write
    written = []

    def dies_in_the_third_unit(self, key, members):
        written.append(key)
        if len(written) == die_at:
            raise Killed
        real_write(self, key, members)

    monkeypatch.setattr(ShardWriter, "write", dies_in_the_third_unit)
    with pytest.raises(Killed):
        run_worker(job(source, out), progress=False)
    monkeypatch.undo()

    done_before = {p.name: p.stat().st_mtime_ns for p in Path(out, "units").glob("*.tar")}
    assert sorted(done_before) == sorted(f"{u.key}.tar" for u in units[:2])
    assert not Path(out, "manifest.json").exists()
    with pytest.raises(PrecomputeError, match=f"{len(units) - 2} of {len(units)} units are not encoded yet"):
        merge(out)

    report = run_worker(job(source, out), progress=False)
    assert (report.shards_skipped, report.shards_written) == (2, len(units) - 2)
    manifest, samples = read_dataset(out)
    assert sorted(s["src.txt"].decode() for s in samples) == sorted(good)
    for name, mtime in done_before.items():  # finished shards were not redone
        assert Path(out, "units", name).stat().st_mtime_ns == mtime

    # A clean run gives byte-identical shards: the resumed dataset is the same dataset.
    clean = str(tmp_path / "clean")
    run_worker(job(source, clean), progress=False)
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in merge(clean)["shards"]]
    assert not list(Path(out).rglob(".*tmp*"))


def test_rerun_with_other_settings_is_refused(tmp_path):
    source, out = str(tmp_path / "src"), str(tmp_path / "out")
    make_image_folder(source, per_class=2)
    run_worker(job(source, out), progress=False)
    with pytest.raises(PrecomputeError, match=r"(?s)other settings.*resolution: 16 there, 32 now"):
        run_worker(job(source, out, resolution=32), progress=False)
    assert run_worker(job(source, out), progress=False).shards_written == 0  # same settings: all done


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for suffix, data in sample.items():
                if suffix != "__key__":
                    info = tarfile.TarInfo(f"{sample['__key__']}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def test_tar_shards_source(tmp_path):
    source = tmp_path / "tars"
    source.mkdir()
    write_tar(
        source / "a.tar",
        [{"__key__": f"a{i}", "jpg": image_bytes(i, fmt="JPEG"), "cls": str(i % 2).encode()} for i in range(5)],
    )
    write_tar(
        source / "b.tar",
        [
            {"__key__": "b0", "png": image_bytes(10), "cls": b"3"},
            {"__key__": "b1", "png": image_bytes(11)},  # no label
            {"__key__": "b2", "jpg": b"\xff\xd8garbage", "cls": b"1"},
        ],
    )
    out = str(tmp_path / "out")
    run_worker(job(str(source), out, image_format="jpg"), progress=False)
    manifest, samples = read_dataset(out)
    assert manifest["source"]["kind"] == "tars" and len(manifest["shards"]) == 2  # one per input tar
    assert manifest["num_classes"] == 4 and manifest["class_names"] == ["0", "1", "2", "3"]
    assert manifest["class_counts"] == [3, 2, 0, 1]
    reasons = {f["file"]: f["reason"] for f in manifest["failures"]["files"]}
    assert sorted(reasons) == ["b.tar:b1", "b.tar:b2"]
    assert reasons["b.tar:b1"].startswith("no class label member")
    assert reasons["b.tar:b2"].startswith("not a readable image")
    assert sorted(s["src.txt"].decode() for s in samples) == [
        "a.tar:a0",
        "a.tar:a1",
        "a.tar:a2",
        "a.tar:a3",
        "a.tar:a4",
        "b.tar:b0",
    ]
    assert all("jpg" in s and "png" not in s for s in samples)


def test_features_store(tmp_path):
    import timm

    from erw.models.encoders import CUSTOM, save_encoder_file

    kwargs = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    save_encoder_file(
        timm.create_model("vit_tiny_patch16_224", num_classes=0, **kwargs),
        "vit_tiny_patch16_224",
        kwargs,
        str(tmp_path / "enc.safetensors"),
    )
    source, out = str(tmp_path / "src"), str(tmp_path / "out")
    make_image_folder(source, per_class=2)
    run_worker(
        job(source, out, store="features", encoder=CUSTOM, encoder_weights=str(tmp_path / "enc.safetensors")),
        progress=False,
    )
    manifest, samples = read_dataset(out)
    assert manifest["store"] == "features" and manifest["feat_shape"] == [16, 32]
    assert all("png" not in s and load_npy(s["feat.npy"]).shape == (16, 32) for s in samples)
    assert load_npy(samples[0]["feat.npy"]).dtype == np.float16


def test_centre_crop_keeps_the_middle():
    # Red and blue bands at the sides, green in the middle: the centre square of a 2:1 image is
    # all green, with (box halvings, bicubic) or without (no resize) the resampling path.
    for width, height, size in [(64, 32, 32), (512, 256, 32), (1000, 500, 64)]:
        pixels = np.zeros((height, width, 3), dtype=np.uint8)
        pixels[:, : width // 8, 0] = 255
        pixels[:, width // 8 : 7 * width // 8, 1] = 255
        pixels[:, 7 * width // 8 :, 2] = 255
        crop = center_crop_adm(Image.fromarray(pixels), size)
        assert crop.shape == (size, size, 3) and crop.dtype == np.uint8
        assert (crop[..., 1] > 250).all() and (crop[..., [0, 2]] < 5).all()
    small = center_crop_adm(Image.fromarray(np.full((8, 12, 3), 77, np.uint8)), 16)  # upsampled
    assert small.shape == (16, 16, 3) and (small == 77).all()


def test_bad_sources_and_options_give_one_clear_message(tmp_path):
    with pytest.raises(SourceError, match="does not exist or holds no files"):
        run_worker(job(str(tmp_path / "nothing"), str(tmp_path / "out")), progress=False)
    Path(tmp_path / "flat").mkdir()
    Path(tmp_path / "flat" / "a.png").write_bytes(image_bytes(0))
    with pytest.raises(SourceError, match="has no class folders"):
        run_worker(job(str(tmp_path / "flat"), str(tmp_path / "out")), progress=False)
    with pytest.raises(PrecomputeError, match=r"--worker-index 2 must be in \[0, --num-workers 2\)"):
        run_worker(job(str(tmp_path / "flat"), str(tmp_path / "out"), worker_index=2, num_workers=2))
    with pytest.raises(PrecomputeError, match="holds no dataset.json"):
        merge(str(tmp_path / "empty"))


def test_cli_fan_out_and_merge(tmp_path, capsys, digits_folder):
    out = str(tmp_path / "shards")
    settings = [
        f"data.source={digits_folder}",
        f"data.shards={out}",
        "data.resolution=32",
        "data.codec=identity",
        "precompute.shard_size=500",
    ]
    assert cli.main(["precompute", "--num-workers", "2", "--worker-index", "1", "--no-progress", *settings]) == 0
    assert cli.main(["precompute", "--merge", "--num-workers", "2", f"data.shards={out}"]) == 2
    assert "rerun --worker-index 0 of 2" in capsys.readouterr().err
    assert cli.main(["precompute", "--num-workers", "2", "--worker-index", "0", "--no-progress", *settings]) == 0
    assert cli.main(["precompute", "--merge", "--num-workers", "2", f"data.shards={out}"]) == 0
    manifest = json.loads(Path(out, "manifest.json").read_text())
    assert manifest["num_samples"] == 1797 and manifest["class_names"] == [str(d) for d in range(10)]
    assert sum(s["count"] for s in manifest["shards"]) == 1797 and all(s["count"] <= 1500 for s in manifest["shards"])


def test_digits_dataset(digits_folder):
    folders = sorted(p.name for p in Path(digits_folder).iterdir())
    assert folders == [str(d) for d in range(10)]
    files = list(Path(digits_folder).glob("*/*.png"))
    assert len(files) == 1797
    image = Image.open(files[0])
    assert image.size == (32, 32) and image.mode == "RGB"
    pixels = np.asarray(image)
    assert pixels.min() < 64 and pixels.max() > 192  # ink on paper, not a blank square


def test_cli_reads_the_training_config_and_its_overrides(tmp_path, capsys, digits_folder):
    """One config for precompute and training: the demo preset's resolution and codec, the
    precompute section from overrides, and the plan step's job built the same way."""
    from erw.config import load_config

    demo = str(Path(__file__).parents[1] / "configs" / "demo.yaml")
    out = tmp_path / "shards"
    settings = [
        f"data.source={digits_folder}",
        f"data.shards={out}",
        "precompute.image_format=npy",
        "precompute.shard_size=900",
    ]
    assert cli.main(["precompute", "--config", demo, "--no-progress", *settings]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["resolution"], manifest["codec"]["name"], manifest["num_samples"]) == (16, "identity", 1797)
    members = {name for shard in out.glob("units/*.tar") for name in tarfile.open(shard).getnames()}
    assert any(m.endswith(".image.npy") for m in members) and not any(m.endswith(".png") for m in members)
    job = PrecomputeJob.from_config(load_config(demo, settings))
    assert (job.resolution, job.codec, job.image_format, job.shard_size, job.out) == (
        16,
        "identity",
        "npy",
        900,
        str(out),
    )

    assert cli.main(["precompute", "--config", demo, *settings[:2], "precompute.store=feature"]) == 2
    err = capsys.readouterr().err
    assert "precompute.store='feature'" in err and "did you mean 'features'" in err
    assert cli.main(["precompute", "--merge"]) == 2
    assert "data.shards is empty" in capsys.readouterr().err
