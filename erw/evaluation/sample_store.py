"""Where `erw sample` puts its images: WebDataset shards, progress markers, a manifest, an .npz.

{out}/settings.json                 what is being generated (a rerun with others is refused)
{out}/shard-XXXXXX.tar              global batch X: {index:08d}.png + {index:08d}.cls
{out}/_progress/shard-XXXXXX.json   written after its shard: the batch is done (resume skips it)
{out}/manifest.json                 written last, by rank 0: the sample set is complete
{out}/samples.npz                   with --npz: ADM layout, arr_0 uint8 [N, H, W, 3], arr_1 labels
"""

from __future__ import annotations

import io
import json
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image
from torch import Tensor

from erw import storage
from erw.data.shards import MANIFEST, ShardWriter, shard_name
from erw.errors import ErwError

FORMAT = "erw-samples"
FORMAT_VERSION = 1
SETTINGS = "settings.json"
PROGRESS = "_progress"
NPZ = "samples.npz"
# Fast PNG compression: encoding runs on the CPU while the GPU waits; files stay lossless.
PNG_COMPRESS_LEVEL = 1


class SampleStoreError(ErwError):
    pass


def png_bytes(image: Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def write_shard(out: str, batch: int, indices: range, labels: Tensor, images: Tensor) -> None:
    """Upload one batch's shard, then its progress marker (the marker means the shard is complete)."""
    with tempfile.TemporaryDirectory() as tmp:
        writer = ShardWriter(Path(tmp) / shard_name(batch))
        for index, label, image in zip(indices, labels.tolist(), images):
            writer.write(f"{index:08d}", {"png": png_bytes(image), "cls": str(label).encode()})
        count, digest, size = writer.close()
        storage.upload_file(writer.path, storage.join(out, shard_name(batch)))
    marker = {"name": shard_name(batch), "count": count, "sha256": digest, "bytes": size}
    storage.write_bytes(_marker_uri(out, batch), json.dumps(marker).encode())


def _marker_uri(out: str, batch: int) -> str:
    return storage.join(out, PROGRESS, shard_name(batch).replace(".tar", ".json"))


def batch_done(out: str, batch: int) -> bool:
    return storage.exists(_marker_uri(out, batch))


def claim_output(out: str, description: dict[str, Any], is_main: bool) -> None:
    """Refuse an --out that holds samples made with other settings; record ours (rank 0)."""
    uri = storage.join(out, SETTINGS)
    if storage.exists(uri):
        existing = json.loads(storage.read_bytes(uri))
        if existing != description:
            differ = sorted(k for k in set(existing) | set(description) if existing.get(k) != description.get(k))
            raise SampleStoreError(
                f"{out} already holds samples made with other settings ({', '.join(differ)} differ): "
                "choose another --out, or delete it to start over"
            )
    elif is_main:
        storage.write_bytes(uri, json.dumps(description, indent=2).encode())


def write_manifest(out: str, num_batches: int, num_samples: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Collect every batch's marker into manifest.json (rank 0, after all ranks finished)."""
    shards = []
    for batch in range(num_batches):
        try:
            shards.append(json.loads(storage.read_bytes(_marker_uri(out, batch))))
        except storage.ObjectNotFound:
            raise SampleStoreError(
                f"batch {batch} of {out} was not written: run `erw sample` again to finish it"
            ) from None
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "store": "images",
        "num_samples": num_samples,
        "shards": shards,
        **extra,
    }
    storage.write_bytes(storage.join(out, MANIFEST), json.dumps(manifest, indent=2).encode())
    return manifest


def write_npz(uri: str, batches: Iterator[tuple[Tensor, Tensor]], count: int, resolution: int) -> None:
    """Stream images into an ADM-style .npz (arr_0 [N, H, W, 3] uint8, arr_1 labels) without
    holding them all in memory: the .npy header is written first, then the rows batch by batch."""
    labels = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / NPZ
        with zipfile.ZipFile(path, "w", allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as member:
                header = {"descr": "|u1", "fortran_order": False, "shape": (count, resolution, resolution, 3)}
                np.lib.format.write_array_header_1_0(member, header)
                written = 0
                for images, y in batches:
                    member.write(images.permute(0, 2, 3, 1).contiguous().numpy().tobytes())
                    labels.append(y.numpy())
                    written += len(images)
            if written != count:
                raise SampleStoreError(f"expected {count} images for {uri}, read {written}")
            with archive.open("arr_1.npy", "w") as member:
                np.save(member, np.concatenate(labels).astype(np.int64))
        storage.upload_file(path, uri)
