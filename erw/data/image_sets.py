"""Image sets the evaluation reads, as uint8 batches [B, 3, H, W] with labels (-1 when unknown).

*.npz             ADM-style batch: arr_0 uint8 [N, H, W, 3], optional arr_1 labels [N]
DIR/manifest.json erw shards holding png/jpg members: `erw sample` output, or `erw precompute`
                  datasets stored with images
anything else     an image source as `erw precompute` reads it (ImageFolder or .tar shards,
                  local or s3://), centre-cropped the ADM way to the samples' resolution
"""

from __future__ import annotations

import io
import json
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from erw import storage
from erw.data.shards import IMAGE_MEMBERS, MANIFEST, decode_crop, read_tar_samples, resolve_uri
from erw.errors import ErwError

Batch = tuple[Tensor, Tensor]  # uint8 images [B, 3, H, W], int64 labels [B]


class ImageSetError(ErwError):
    """An image set that cannot be read; the message says what is wrong."""


@dataclass
class ImageSet:
    uri: str
    kind: str  # "npz" | "shards" | "source"
    count: int | None  # None when only a full read would tell (image sources)
    manifest: dict[str, Any] | None = None
    arrays: dict[str, np.ndarray] | None = None  # the .npz contents
    source: Any = None  # erw.data.sources.Source of an image source

    @property
    def resolution(self) -> int | None:
        if self.arrays is not None:
            return int(self.arrays["arr_0"].shape[1])
        if self.manifest is not None:
            return int(self.manifest["resolution"])
        return None

    def batches(self, batch_size: int, limit: int | None = None, resolution: int | None = None) -> Iterator[Batch]:
        """Up to `limit` images in a fixed order; `resolution` is the crop of image sources."""
        stream = {"npz": self._npz, "shards": self._shards, "source": lambda: self._source(resolution)}[self.kind]()
        yield from _rebatch(stream, batch_size, limit)

    def _npz(self) -> Iterator[Batch]:
        images = self.arrays["arr_0"]
        labels = self.arrays.get("arr_1")
        for start in range(0, len(images), 256):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + 256])).permute(0, 3, 1, 2)
            y = labels[start : start + 256] if labels is not None else np.full(len(chunk), -1)
            yield chunk, torch.as_tensor(y, dtype=torch.int64)

    def _shards(self) -> Iterator[Batch]:
        for shard in self.manifest["shards"]:
            for sample in read_tar_samples(resolve_uri(self.uri, shard["name"])):
                image_format = next((f for f, member in IMAGE_MEMBERS.items() if member in sample), None)
                if image_format is None:
                    raise ImageSetError(
                        f"{shard['name']}:{sample['__key__']} in {self.uri} has no image member "
                        f"({', '.join(IMAGE_MEMBERS.values())})"
                    )
                pixels = decode_crop(sample[IMAGE_MEMBERS[image_format]], image_format).copy()
                label = int(sample["cls"].decode()) if "cls" in sample else -1
                yield torch.from_numpy(pixels).permute(2, 0, 1)[None], torch.tensor([label])

    def _source(self, resolution: int | None) -> Iterator[Batch]:
        from erw.data.sources import BadImage, decode_image

        if resolution is None:
            raise ImageSetError(f"{self.uri} is an image source: the crop resolution must be given")
        with ThreadPoolExecutor(8) as executor:
            for unit in self.source.units:
                for raw in self.source.read(unit, executor):
                    if raw.data is None:
                        continue
                    try:
                        pixels = decode_image(raw.data, resolution)
                    except BadImage:
                        continue  # the precompute job reports these; evaluation just skips them
                    label = raw.label if raw.label is not None else -1
                    yield torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None], torch.tensor([label])


def _rebatch(stream: Iterator[Batch], batch_size: int, limit: int | None) -> Iterator[Batch]:
    images: list[Tensor] = []
    labels: list[Tensor] = []
    held = seen = 0
    for x, y in stream:
        if limit is not None:
            x, y = x[: limit - seen], y[: limit - seen]
        images.append(x)
        labels.append(y)
        held += len(x)
        seen += len(x)
        while held >= batch_size:
            x_all, y_all = torch.cat(images), torch.cat(labels)
            yield x_all[:batch_size], y_all[:batch_size]
            images, labels = [x_all[batch_size:]], [y_all[batch_size:]]
            held -= batch_size
        if limit is not None and seen >= limit:
            break
    if held:
        yield torch.cat(images), torch.cat(labels)


def check_images_array(images: np.ndarray, where: str) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
        raise ImageSetError(
            f"{where}: arr_0 must hold square uint8 RGB images [N, H, W, 3] (the ADM layout), "
            f"got {images.dtype} {list(images.shape)}"
        )


def read_npz(uri: str) -> dict[str, np.ndarray]:
    """All arrays of an .npz file (local or s3://), without unpickling anything."""
    try:
        handle = io.BytesIO(storage.read_bytes(uri)) if storage.is_s3(uri) else uri
        with np.load(handle, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except FileNotFoundError:
        raise ImageSetError(f"{uri} does not exist") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ImageSetError(f"{uri} is not a readable .npz file: {err}") from None


def open_image_set(uri: str) -> ImageSet:
    """Open and check an image set; images are read lazily, except those of .npz files."""
    if uri.endswith(".npz"):
        arrays = read_npz(uri)
        if "arr_0" not in arrays:
            raise ImageSetError(f"{uri} has no arr_0 images (keys: {', '.join(sorted(arrays)) or 'none'})")
        check_images_array(arrays["arr_0"], uri)
        return ImageSet(uri, "npz", len(arrays["arr_0"]), arrays=arrays)
    manifest_uri = storage.join(uri, MANIFEST)
    if storage.exists(manifest_uri):
        manifest = json.loads(storage.read_bytes(manifest_uri))
        if manifest.get("store", "images") != "images":
            raise ImageSetError(
                f"{uri} stores encoder features, not images (precomputed with --store {manifest.get('store')}): "
                "precompute with --store images, or give an ADM .npz or the image source itself"
            )
        return ImageSet(uri, "shards", int(manifest["num_samples"]), manifest=manifest)
    from erw.data.sources import open_source

    return ImageSet(uri, "source", None, source=open_source(uri, shard_size=1000))
