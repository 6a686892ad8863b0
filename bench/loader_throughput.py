"""Data-plane throughput, as ratios measured side by side in one run.

    python bench/loader_throughput.py [--samples 1024] [--resolution 256] [--workers 2] [--batch-size 32]

1. Precompute images/s of `erw precompute` on the same synthetic ImageFolder (JPEG photos-like
   images, non-square so the ADM crop resizes) with the identity codec and with a small
   random-weight AutoencoderKL that has SD-VAE's latent shape (4 x R/8 x R/8).
2. Loader samples/s: the shard loader against a per-file loader that reads one .npy of
   moments and one .png per sample (the layout of the public REPA/ERW code), on the same
   samples, with the same batch size, worker count and per-sample work (decode the PNG, draw
   the latent from the moments), from local disk and from an S3 endpoint (moto's server on
   127.0.0.1, so per-request latency is far below a real object store's: the S3 ratio here is
   a lower bound).

Absolute numbers drift with the machine's load; compare the ratios.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import boto3
import numpy as np
import torch
from moto.server import ThreadedMotoServer
from PIL import Image

from erw.config import DataConfig
from erw.data import storage
from erw.data.loader import build_loader
from erw.data.precompute import PrecomputeJob, run_worker
from erw.data.shards import read_tar_samples


def synthetic_image_folder(root: Path, samples: int, resolution: int) -> None:
    """Smooth random colour fields with grain, 5:4, JPEG, 10 classes: PNG sizes like photos'."""
    rng = np.random.default_rng(0)
    width, height = resolution * 5 // 4, resolution
    for i in range(samples):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
        pixels = np.clip(field + rng.integers(-12, 13, field.shape), 0, 255).astype(np.uint8)
        path = root / f"class{i % 10}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)


def small_sd_shaped_vae(path: Path) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4, layers_per_block=1,
    ).save_pretrained(path)


def precompute_rate(source: Path, out: Path, resolution: int, codec: str, weights: str, batch: int) -> float:
    job = PrecomputeJob(source=str(source), out=str(out), resolution=resolution, codec=codec, codec_weights=weights,
                        batch_size=batch, shard_size=256, device="cpu")
    return run_worker(job, progress=False).images_per_second


def per_file_layout(shards: str, out: str) -> int:
    """Write {i}.npy (moments) and {i}.png for every sample of the shards: the same bytes."""
    manifest = json.loads(storage.read_bytes(storage.join(shards, "manifest.json")))
    labels = []
    for shard in manifest["shards"]:
        for sample in read_tar_samples(storage.join(shards, shard["name"])):
            i = len(labels)
            storage.write_bytes(storage.join(out, f"{i}.npy"), sample["latent.npy"])
            storage.write_bytes(storage.join(out, f"{i}.png"), sample["png"])
            labels.append(int(sample["cls"]))
    storage.write_bytes(storage.join(out, "labels.json"), json.dumps(labels).encode())
    return len(labels)


class PerFileDataset(torch.utils.data.Dataset):
    """Random access to one .npy + one .png per sample, as in the public reference code."""

    def __init__(self, root: str, scale: float):
        self.root, self.scale = root, scale
        self.labels = json.loads(storage.read_bytes(storage.join(root, "labels.json")))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        moments = np.load(io.BytesIO(storage.read_bytes(storage.join(self.root, f"{i}.npy")))).astype(np.float32)
        mean, std = np.split(moments, 2)
        latent = (mean + std * np.random.default_rng(i).standard_normal(mean.shape, dtype=np.float32)) * self.scale
        with Image.open(io.BytesIO(storage.read_bytes(storage.join(self.root, f"{i}.png")))) as image:
            pixels = np.asarray(image.convert("RGB")).transpose(2, 0, 1).copy()
        return {"latent": latent, "label": self.labels[i], "image": pixels}


def rate(batches, count: int, batch_size: int) -> float:
    iterator = iter(batches)
    next(iterator)  # worker start-up and first fetch excluded, for both loaders alike
    started = time.perf_counter()
    for _ in range(count):
        next(iterator)
    return count * batch_size / (time.perf_counter() - started)


def compare_loaders(shards: str, per_file: str, args: argparse.Namespace) -> tuple[float, float]:
    steps = args.samples // args.batch_size - 1
    cfg = DataConfig(shards=shards, resolution=args.resolution, codec="sd-vae-ft-ema", num_workers=args.workers,
                     shuffle_buffer=1000)
    shard_rate = rate(build_loader(cfg, args.batch_size, 0, 1, seed=0, with_images=True), steps, args.batch_size)
    baseline = torch.utils.data.DataLoader(
        PerFileDataset(per_file, 0.18215), batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
        drop_last=True,
    )
    return shard_rate, rate(baseline, steps, args.batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="erw-bench-") as tmp:
        root = Path(tmp)
        synthetic_image_folder(root / "images", args.samples, args.resolution)
        small_sd_shaped_vae(root / "vae")
        vae_rate = precompute_rate(root / "images", root / "shards", args.resolution, "sd-vae-ft-ema",
                                   str(root / "vae"), 32)
        subset = root / "subset"
        for path in sorted((root / "images").glob("*/*.jpg"))[:256]:
            (subset / path.parent.name).mkdir(parents=True, exist_ok=True)
            (subset / path.parent.name / path.name).write_bytes(path.read_bytes())
        identity_rate = precompute_rate(subset, root / "identity", args.resolution, "identity", "", 32)

        per_file_layout(str(root / "shards"), str(root / "per-file"))
        local = compare_loaders(str(root / "shards"), str(root / "per-file"), args)

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        try:
            boto3.client("s3").create_bucket(Bucket="bench")
            for file in (root / "shards").glob("*.*"):
                storage.upload_file(file, f"s3://bench/shards/{file.name}")
            per_file_layout("s3://bench/shards", "s3://bench/per-file")
            remote = compare_loaders("s3://bench/shards", "s3://bench/per-file", args)
        finally:
            server.stop()

    print(f"{args.samples} samples, {args.resolution}px, batch {args.batch_size}, {args.workers} workers, "
          f"latents 4x{args.resolution // 8}x{args.resolution // 8} moments + PNG crop per sample")
    print(f"precompute (CPU): identity codec {identity_rate:.1f} images/s, small AutoencoderKL {vae_rate:.1f} images/s")
    print(f"{'storage':8s} {'shards':>14s} {'per-file':>14s} {'ratio':>7s}")
    for name, (shards_rate, files_rate) in (("local", local), ("s3", remote)):
        print(f"{name:8s} {shards_rate:10.1f} s/s {files_rate:10.1f} s/s {shards_rate / files_rate:6.2f}x")


if __name__ == "__main__":
    main()
