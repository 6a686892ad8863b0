"""Data-plane throughput, as ratios measured side by side in one run.

    python -m bench.loader_throughput [--samples 512] [--resolution 256] [--workers 2] [--batch-size 32]

1. Precompute images/s of `erw precompute` (CPU) on a synthetic ImageFolder of photo-like
   JPEGs (5:4, so the ADM crop resizes), with the identity codec and with a small
   random-weight AutoencoderKL that has SD-VAE's latent shape (4 x R/8 x R/8).
2. Loader samples/s on the same samples, batch size and worker count: the shard loader with
   the crop stored raw (--image-format npy) and as PNG, against a per-file loader that reads
   one .npy of moments and one .png per sample (the layout of the public REPA/ERW code) and
   does the same per-sample work (decode the crop, draw the latent from the moments); from
   local disk and from an S3 endpoint. The endpoint is moto's server on 127.0.0.1, in this
   process: per-request latency is far below a real object store's, so the per-file loader's
   main cost on S3 (two requests per sample) is understated and the S3 ratios are lower bounds.

Absolute numbers drift with the machine's load; compare the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import boto3
import numpy as np
import torch
from moto.server import ThreadedMotoServer
from PIL import Image

from erw.config import DataConfig
from erw import storage
from erw.data.loader import build_loader
from erw.data.precompute import PrecomputeJob, run_worker
from erw.data.shards import MANIFEST, ShardWriter, encode_crop, load_npy, read_tar_samples


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
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    ).save_pretrained(path)


def precompute_rate(source: Path, out: Path, resolution: int, codec: str, weights: str, image_format: str) -> float:
    job = PrecomputeJob(
        source=str(source),
        out=str(out),
        resolution=resolution,
        codec=codec,
        codec_weights=weights,
        image_format=image_format,
        batch_size=32,
        shard_size=256,
        device="cpu",
    )
    with contextlib.redirect_stdout(sys.stderr):  # the workers' progress lines; stdout is the table
        return run_worker(job, progress=False).images_per_second


def with_png_crops(shards: Path, out: Path) -> None:
    """The same dataset with the crops stored as PNG instead of raw pixels."""
    manifest = json.loads((shards / MANIFEST).read_text())
    out.mkdir()
    for entry in manifest["shards"]:
        writer = ShardWriter(out / entry["name"])
        for sample in read_tar_samples(str(shards / entry["name"])):
            members = {k: v for k, v in sample.items() if not k.startswith("__") and k != "image.npy"}
            members["png"] = encode_crop(load_npy(sample["image.npy"]), "png")
            writer.write(sample["__key__"], members)
        _, entry["sha256"], entry["bytes"] = writer.close()
    (out / MANIFEST).write_text(json.dumps({**manifest, "image_format": "png"}))


def per_file_layout(shards: str, out: str) -> None:
    """Write {i}.npy (moments) and {i}.png for every sample of PNG shards: the same bytes."""
    manifest = json.loads(storage.read_bytes(storage.join(shards, MANIFEST)))
    labels = []
    for shard in manifest["shards"]:
        for sample in read_tar_samples(storage.join(shards, shard["name"])):
            i = len(labels)
            storage.write_bytes(storage.join(out, f"{i}.npy"), sample["latent.npy"])
            storage.write_bytes(storage.join(out, f"{i}.png"), sample["png"])
            labels.append(int(sample["cls"]))
    storage.write_bytes(storage.join(out, "labels.json"), json.dumps(labels).encode())


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


def loader_rates(root: str, args: argparse.Namespace) -> dict[str, float]:
    """samples/s of the shard loader (raw and PNG crops) and of the per-file loader under root."""
    steps = args.samples // args.batch_size - 1
    rates = {}
    for name in ("shards-npy", "shards-png"):
        cfg = DataConfig(
            shards=storage.join(root, name),
            resolution=args.resolution,
            codec="sd-vae-ft-ema",
            num_workers=args.workers,
            shuffle_buffer=1000,
        )
        rates[name] = rate(build_loader(cfg, args.batch_size, 0, 1, seed=0, with_images=True), steps, args.batch_size)
    per_file = torch.utils.data.DataLoader(
        PerFileDataset(storage.join(root, "per-file"), 0.18215),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        drop_last=True,
    )
    rates["per-file"] = rate(per_file, steps, args.batch_size)
    return rates


def start_s3_endpoint() -> ThreadedMotoServer:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    boto3.client("s3").create_bucket(Bucket="bench")
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="erw-bench-") as tmp:
        root = Path(tmp)
        synthetic_image_folder(root / "images", args.samples, args.resolution)
        small_sd_shaped_vae(root / "vae")
        vae_rate = precompute_rate(
            root / "images", root / "shards-npy", args.resolution, "sd-vae-ft-ema", str(root / "vae"), "npy"
        )
        subset = root / "subset"
        for path in sorted((root / "images").glob("*/*.jpg"))[:128]:
            (subset / path.parent.name).mkdir(parents=True, exist_ok=True)
            (subset / path.parent.name / path.name).write_bytes(path.read_bytes())
        identity_rate = precompute_rate(subset, root / "identity", args.resolution, "identity", "", "png")
        with_png_crops(root / "shards-npy", root / "shards-png")
        per_file_layout(str(root / "shards-png"), str(root / "per-file"))
        local = loader_rates(str(root), args)

        server = start_s3_endpoint()
        try:
            for file in root.glob("shards-*/*.*"):  # the shards and manifest.json
                storage.upload_file(file, f"s3://bench/{file.parent.name}/{file.name}")
            for file in (root / "per-file").iterdir():
                storage.upload_file(file, f"s3://bench/per-file/{file.name}")
            remote = loader_rates("s3://bench", args)
        finally:
            server.stop()

    print(
        f"{args.samples} samples, {args.resolution}px, batch {args.batch_size}, {args.workers} workers; each sample: "
        f"latent moments 8x{args.resolution // 8}x{args.resolution // 8} fp16 + the {args.resolution}px crop"
    )
    print(f"precompute (CPU): identity codec {identity_rate:.1f} images/s, small AutoencoderKL {vae_rate:.1f} images/s")
    print(f"{'':6s} {'shards, raw crop':>17s} {'shards, png crop':>17s} {'per-file png':>13s}   ratios to per-file")
    for name, r in (("local", local), ("s3", remote)):
        print(
            f"{name:6s} {r['shards-npy']:13.1f} s/s {r['shards-png']:13.1f} s/s {r['per-file']:9.1f} s/s   "
            f"raw {r['shards-npy'] / r['per-file']:.2f}x, png {r['shards-png'] / r['per-file']:.2f}x"
        )


if __name__ == "__main__":
    main()
