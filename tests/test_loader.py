"""The shard loader: exact coverage per epoch across nodes x workers, exact resume, S3, checks."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from erw.config import DataConfig
from erw import storage
from erw.data.loader import Decoding, DatasetError, buffered_order, build_loader, decode_sample, read_manifest
from erw.data.precompute import PrecomputeJob, run_worker
from erw.data.shards import npy_bytes
from erw.data.codec import LatentNorm

NUM_IMAGES = 60


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """60 images of 3 classes in shards of about 7 (cut by content, see sources.py), identity codec, 16px."""
    from PIL import Image

    root = tmp_path_factory.mktemp("loader")
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        path = root / "images" / f"class{i % 3}" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    out = str(root / "shards")
    job = PrecomputeJob(
        source=str(root / "images"), out=out, resolution=16, codec="identity", shard_size=7, batch_size=16, io_threads=2
    )
    run_worker(job, progress=False)
    return out


def config(shards: str, **kw) -> DataConfig:
    return DataConfig(
        **{"shards": shards, "resolution": 16, "codec": "identity", "num_workers": 2, "shuffle_buffer": 10, **kw}
    )


def take(loader, n: int) -> list[dict[str, torch.Tensor]]:
    iterator = iter(loader)
    return [next(iterator) for _ in range(n)]


def test_two_nodes_two_workers_cover_each_sample_once_per_epoch(shards):
    seen = []  # (epoch, index) over both ranks
    for rank in range(2):
        loader = build_loader(config(shards), batch_size=4, rank=rank, world_size=2, seed=3, with_images=True)
        for batch in take(loader, 20):  # 80 samples per rank: past two epochs of 30
            assert batch["latent"].shape == (4, 3, 16, 16) and batch["latent"].dtype == torch.float32
            assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.uint8
            assert batch["label"].dtype == torch.int64
            seen += zip(batch["epoch"].tolist(), batch["index"].tolist())
    for epoch in (0, 1):
        counts = Counter(index for e, index in seen if e == epoch)
        assert sorted(counts) == list(range(NUM_IMAGES)) and set(counts.values()) == {1}
    order = {e: [i for ee, i in seen if ee == e] for e in (0, 1)}
    assert order[0] != order[1]  # reshuffled every epoch


def test_batches_carry_the_stored_sample(shards):
    loader = build_loader(config(shards, num_workers=0), batch_size=5, rank=0, world_size=1, seed=0, with_images=True)
    batch = take(loader, 1)[0]
    # identity codec: the latent is the crop in [-1, 1]; the label is the class folder
    torch.testing.assert_close(batch["latent"], batch["image"].float() / 127.5 - 1, atol=1e-3, rtol=0)
    assert torch.equal(batch["label"], torch.tensor([int(i) % 3 for i in _source_numbers(shards, batch["index"])]))


def _source_numbers(shards: str, indices: torch.Tensor) -> list[int]:
    """Image number of each global sample index, from the src.txt members ('class1/004.png' -> 4)."""
    from erw.data.loader import read_manifest
    from erw.data.shards import read_tar_samples

    names = [
        s["src.txt"].decode()
        for shard in read_manifest(shards)["shards"]
        for s in read_tar_samples(storage.join(shards, shard["name"]))
    ]
    return [int(names[i].split("/")[1][:3]) for i in indices.tolist()]


@pytest.mark.parametrize("num_workers", [2, 0])
def test_resumed_loader_yields_exactly_the_same_batches(shards, num_workers):
    cfg = config(shards, num_workers=num_workers)
    first = build_loader(cfg, batch_size=4, rank=1, world_size=2, seed=7, with_images=True)
    iterator = iter(first)
    for _ in range(9):  # 36 samples: past the rank's first epoch (30), mid-buffer
        next(iterator)
    state = first.state_dict()
    expected = [next(iterator) for _ in range(6)]

    resumed = build_loader(cfg, batch_size=4, rank=1, world_size=2, seed=7, with_images=True)
    resumed.load_state_dict(state)
    got = take(resumed, 6)
    for want, have in zip(expected, got):
        assert want.keys() == have.keys()
        for key in want:
            assert torch.equal(want[key], have[key]), key


def test_raw_crops_load_like_png_crops(shards, tmp_path):
    raw = str(tmp_path / "raw")
    run_worker(
        PrecomputeJob(
            source=str(Path(shards).parent / "images"),
            out=raw,
            resolution=16,
            codec="identity",
            shard_size=7,
            image_format="npy",
            io_threads=2,
        ),
        progress=False,
    )
    png_batches = take(build_loader(config(shards, num_workers=0), 6, 0, 1, seed=2, with_images=True), 3)
    raw_batches = take(build_loader(config(raw, num_workers=0), 6, 0, 1, seed=2, with_images=True), 3)
    for a, b in zip(png_batches, raw_batches):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_loader_reads_shards_from_s3(shards, s3_bucket):
    remote = f"{s3_bucket}/datasets/tiny"
    _upload(shards, remote)
    local = take(build_loader(config(shards), 4, 0, 1, seed=1, with_images=True), 4)
    over_s3 = take(build_loader(config(remote), 4, 0, 1, seed=1, with_images=True), 4)
    for a, b in zip(local, over_s3):
        assert all(torch.equal(a[k], b[k]) for k in a)

    import webdataset as wds  # plain webdataset pipelines can stream s3:// too

    first = read_manifest(remote)["shards"][0]
    keys = [s["__key__"] for s in wds.WebDataset(f"{remote}/{first['name']}", shardshuffle=False)]
    assert keys == [f"{first['unit'][:16]}_{i:06d}" for i in range(first["count"])]


def test_latent_is_sampled_from_the_moments_every_epoch():
    mean = np.full((2, 4, 4), 1.5, np.float32)
    std = np.full((2, 4, 4), 0.5, np.float32)
    sample = {"latent.npy": npy_bytes(np.concatenate([mean, std]).astype(np.float16)), "cls": b"3"}
    how = Decoding(seed=0, norm=LatentNorm.uniform(2, 0.5), image_format=None, with_features=False)
    a, again, other_epoch = (decode_sample(e, 11, sample, how)["latent"] for e in (0, 0, 1))
    assert np.array_equal(a, again) and not np.array_equal(a, other_epoch)
    noise = (a - 1.5) / 0.5
    assert abs(noise.mean()) < 1 and 0.3 < noise.std() < 2  # standard normal noise, 32 draws


def test_buffered_order_is_a_bounded_permutation():
    rng = np.random.default_rng(0)
    order = buffered_order(500, 32, rng)
    assert sorted(order.tolist()) == list(range(500))
    assert all(item <= t + 31 for t, item in enumerate(order.tolist()))  # never reads ahead of the buffer
    assert order.tolist() != list(range(500))
    assert buffered_order(50, 1, rng).tolist() == list(range(50))  # buffer 1 = no shuffle


def test_incomplete_dataset_is_refused(shards, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(shards, partial)
    (partial / "manifest.json").unlink()
    with pytest.raises(DatasetError, match="has no manifest.json: the dataset is incomplete"):
        build_loader(config(str(partial)), 4, 0, 1, seed=0, with_images=False)


def test_manifest_must_match_the_config(shards):
    with pytest.raises(DatasetError, match="data.resolution=32 but the shards are 16px"):
        build_loader(config(shards, resolution=32), 4, 0, 1, seed=0, with_images=False)
    with pytest.raises(DatasetError, match="data.codec='sd-vae-ft-ema' but the shards were encoded with 'identity'"):
        build_loader(config(shards, codec="sd-vae-ft-ema"), 4, 0, 1, seed=0, with_images=False)


def test_resume_with_another_global_batch_seed_or_buffer_is_refused(shards):
    state = build_loader(config(shards), 4, 0, 2, seed=0, with_images=False).state_dict()
    with pytest.raises(DatasetError, match=r"the global batch \(batch_size of the phase\): 8 then, 16 now"):
        build_loader(config(shards), 4, 0, 4, seed=0, with_images=False).load_state_dict(state)
    with pytest.raises(DatasetError, match="seed: 0 then, 1 now"):
        build_loader(config(shards), 4, 0, 2, seed=1, with_images=False).load_state_dict(state)
    with pytest.raises(DatasetError, match="data.shuffle_buffer: 10 then, 11 now"):
        build_loader(config(shards, shuffle_buffer=11), 4, 0, 2, seed=0, with_images=False).load_state_dict(state)
    with pytest.raises(DatasetError, match="older erw"):
        build_loader(config(shards), 4, 0, 2, seed=0, with_images=False).load_state_dict({"version": 1, "batches": 3})


def _global_rounds(shards: str, world: int, micro: int, rounds: int, workers: int, state=None):
    """(state after `state` rounds or None, the global batches): every rank's micro-batches of a
    round laid end to end in rank order, as one dict of tensors per round."""
    loaders = [
        build_loader(config(shards, num_workers=workers), micro, rank, world, seed=5, with_images=True, global_batch=8)
        for rank in range(world)
    ]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    per_round = 8 // (world * micro)
    iterators = [iter(loader) for loader in loaders]
    out = []
    for _ in range(rounds):
        parts = [next(it) for it in iterators for _ in range(per_round)]
        out.append({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
    return loaders[0].state_dict(), out


@pytest.mark.parametrize("world, new_world, workers, new_workers", [(2, 1, 1, 2), (1, 2, 2, 1), (4, 2, 1, 1)])
def test_elastic_resume_continues_the_global_sample_order(shards, world, new_world, workers, new_workers):
    """Checkpointed after 5 rounds on `world` ranks, resumed on `new_world`: rounds 5..11 hold the
    same samples, in the same places of the global batch, with the same latents."""
    _, uninterrupted = _global_rounds(shards, world, 8 // world, 12, workers)
    state, _ = _global_rounds(shards, world, 8 // world, 5, workers)
    assert state["rounds"] == 5
    micro = 8 // new_world // 2 if new_world == 1 else 8 // new_world  # 1 rank: 2 micro-batches (grad_accum)
    _, resumed = _global_rounds(shards, new_world, micro, 7, new_workers, state=state)
    for want, have in zip(uninterrupted[5:], resumed):
        assert want.keys() == have.keys()
        for key in want:
            assert torch.equal(want[key], have[key]), key
    seen = Counter(zip(*(torch.cat([r[k] for r in uninterrupted[:5] + resumed]).tolist() for k in ("epoch", "index"))))
    assert set(seen.values()) == {1}  # no sample of an epoch seen twice
    assert {i for e, i in seen if e == 0} == set(range(NUM_IMAGES))  # nor skipped: 12 rounds of 8 > one epoch


def _rewrite(shards: str, to: Path, shard: str, change) -> str:
    """A copy of the dataset where change(position, members) -> members rewrote one shard (its
    manifest entry updated, so only the content is wrong)."""

    from erw.data.shards import ShardWriter, read_tar_samples

    shutil.copytree(shards, to)
    samples = list(read_tar_samples(str(to / shard)))
    writer = ShardWriter(to / shard)
    for position, sample in enumerate(samples):
        members = {k: v for k, v in sample.items() if not k.startswith("__")}
        writer.write(sample["__key__"], change(position, members))
    count, digest, size = writer.close()
    _set_manifest(str(to), shard, count=count, sha256=digest, bytes=size)
    return str(to)


def _set_manifest(dataset: str, shard: str, **fields) -> None:
    import json

    path = Path(dataset, "manifest.json")
    manifest = json.loads(path.read_text())
    for entry in manifest["shards"]:
        if entry["name"] == shard:
            entry.update(fields)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_shard_that_does_not_match_its_sha256_is_named(shards, tmp_path, num_workers):
    altered = tmp_path / "altered"
    shutil.copytree(shards, altered)
    name = _entry(shards, 3)["name"]
    _set_manifest(str(altered), name, sha256="0" * 64)
    loader = build_loader(config(str(altered), num_workers=num_workers), 4, 0, 1, seed=0, with_images=False)
    with pytest.raises(DatasetError, match=f"{name} does not match its manifest entry") as caught:
        take(loader, 40)  # past one epoch: every shard was read whole once
    assert "\n" not in str(caught.value)


def test_altered_latent_bytes_are_caught_by_the_checksum(shards, tmp_path):
    def flip(position, members):
        data = bytearray(members["latent.npy"])
        data[-1] ^= 0x01  # a finite change: the tar stays valid, same size
        return {**members, "latent.npy": bytes(data)}

    sound = _entry(shards, 2)
    altered = _rewrite(shards, tmp_path / "altered", sound["name"], flip)
    _set_manifest(altered, sound["name"], sha256=sound["sha256"])  # the manifest of the sound shard
    loader = build_loader(config(altered, num_workers=0), 4, 0, 1, seed=0, with_images=False)
    with pytest.raises(DatasetError, match=f"{sound['name']} does not match its manifest entry"):
        take(loader, 40)


def test_a_truncated_or_missing_shard_is_refused_before_compute(shards, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(shards, cut)
    short, gone = _entry(shards, 4)["name"], _entry(shards, 6)["name"]
    data = (cut / short).read_bytes()
    (cut / short).write_bytes(data[: len(data) // 2])
    (cut / gone).unlink()
    with pytest.raises(DatasetError) as caught:
        build_loader(config(str(cut)), 4, 0, 1, seed=0, with_images=False)
    assert f"{short} has {len(data) // 2} bytes, the manifest says {len(data)}" in str(caught.value)
    assert f"{gone} is missing" in str(caught.value)


def test_a_corrupt_tar_is_named_in_one_line(shards, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    name = _entry(shards, 1)["name"]
    size = (bad / name).stat().st_size
    (bad / name).write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    loader = build_loader(config(str(bad), num_workers=2), 4, 0, 1, seed=0, with_images=False)
    with pytest.raises(DatasetError, match=f"{name} is not a readable tar shard") as caught:
        take(loader, 40)
    assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value)


def test_model_with_fewer_classes_than_the_data_is_refused(shards):
    with pytest.raises(DatasetError, match="model.num_classes=2 but the shards hold 3 classes"):
        build_loader(config(shards), 4, 0, 1, seed=0, with_images=False, num_classes=2)
    build_loader(config(shards), 4, 0, 1, seed=0, with_images=False, num_classes=5)  # spare classes are fine


def _bad_samples(position, members):
    if position == 1:
        return {**members, "cls": b"42"}
    if position == 3:
        return {**members, "latent.npy": npy_bytes(np.zeros((6, 8, 8), np.float16))}
    if position == 5:
        return {**members, "latent.npy": b"not an npy file"}
    return members


def test_bad_samples_are_dropped_named_and_counted(shards, tmp_path, capfd):
    name = _entry(shards, 0)["name"]  # samples 0.. of the dataset
    bad = _rewrite(shards, tmp_path / "bad", name, _bad_samples)
    loader = build_loader(config(bad, num_workers=0, max_bad_samples=3), 4, 0, 1, seed=0, with_images=True)
    batches = take(loader, 15)  # one epoch: 60 samples
    indices = torch.cat([b["index"] for b in batches]).tolist()
    assert sorted(indices) == sorted(set(range(NUM_IMAGES)) - {1, 3, 5})
    err = capfd.readouterr().err
    assert f"{name}:" in err and "label 42 outside [0, 3) (" in err
    assert "(3 of data.max_bad_samples=3 in this worker)" in err
    assert "latent moments of shape [6, 8, 8], the manifest says [6, 16, 16]" in err
    assert "unreadable member" in err

    strict = build_loader(config(bad, num_workers=2, max_bad_samples=0), 4, 0, 1, seed=0, with_images=True)
    with pytest.raises(DatasetError, match=f"{name}:.*: .*more than data.max_bad_samples=0") as caught:
        take(strict, 15)
    assert "\n" not in str(caught.value)


@pytest.mark.slow
def test_warmup_then_train_read_shards_from_s3(digits_folder, s3_bucket, capsys):
    """`erw warmup` and `erw train` (demo preset, tiny model) stream their batches from S3 shards."""
    from erw import cli
    from erw.training import checkpoint as ckpt

    source, out = f"{s3_bucket}/digits", f"{s3_bucket}/shards"
    for path in sorted(Path(digits_folder).glob("*/*.png"))[::45]:  # 40 real digits
        storage.upload_file(path, f"{source}/{path.parent.name}/{path.name}")
    assert (
        cli.main(
            [
                "precompute",
                "--no-progress",
                f"data.source={source}",
                f"data.shards={out}",
                "data.resolution=16",
                "data.codec=identity",
                "precompute.shard_size=16",
            ]
        )
        == 0
    )
    tiny = [
        "model.depth=4",
        "model.hidden_size=64",
        "model.num_heads=2",
        "model.projector_dim=32",
        "model.l2r_depth=2",
        "model.align_depth=3",
        f"data.shards={out}",
        "data.num_workers=2",
        "warmup.batch_size=8",
        "train.batch_size=8",
        "warmup.steps=2",
        "train.steps=2",
        "warmup.ckpt_every=2",
        "train.ckpt_every=2",
        f"warmup.out={s3_bucket}/run/warmup",
        f"train.out={s3_bucket}/run/train",
    ]
    demo = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    assert cli.main(["warmup", "--config", demo, *tiny]) == 0
    assert cli.main(["train", "--config", demo, *tiny, "--init-from", f"{s3_bucket}/run/warmup"]) == 0
    assert "train finished at step 2" in capsys.readouterr().out
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(f"{s3_bucket}/run/train"))
    assert saved.train_state["data"]["rounds"] == 2 and saved.train_state["data"]["num_samples"] == 40


def _upload(shards: str, remote: str) -> None:
    for file in Path(shards).rglob("*"):
        if file.is_file():
            storage.upload_file(file, f"{remote}/{file.relative_to(shards).as_posix()}")


def _entry(dataset: str, i: int) -> dict:
    """The manifest entry of the i-th shard (name relative to the dataset, count, sha256, bytes)."""
    import json

    return json.loads(Path(dataset, "manifest.json").read_text())["shards"][i]


def test_loader_rides_out_an_s3_outage(shards, s3_bucket, s3_proxy, monkeypatch):
    remote = f"{s3_bucket}/datasets/tiny"
    _upload(shards, remote)
    expected = take(build_loader(config(shards), 4, 0, 1, seed=1, with_images=False), 8)
    loader = iter(build_loader(config(remote), 4, 0, 1, seed=1, with_images=False))
    got = [next(loader)]
    s3_proxy.outage(3)  # the endpoint restarts while the workers stream
    got += [next(loader) for _ in range(7)]
    assert s3_proxy.injected["outage"] >= 1
    for a, b in zip(expected, got):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_s3_outage_past_the_budget_stops_the_loader_with_one_line(shards, s3_bucket, s3_proxy, monkeypatch):
    remote = f"{s3_bucket}/datasets/tiny"
    _upload(shards, remote)
    loader = build_loader(config(remote), 4, 0, 1, seed=1, with_images=False)
    monkeypatch.setenv("ERW_S3_RETRY_SECONDS", "1")  # inherited by the DataLoader workers
    s3_proxy.outage(600)
    with pytest.raises(storage.StorageError) as caught:
        take(loader, 20)
    message = str(caught.value)
    assert message.startswith("cannot read s3://") and "retried for" in message
    assert "\n" not in message and "Traceback" not in message
