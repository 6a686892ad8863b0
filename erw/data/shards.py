"""WebDataset tar shards: a deterministic writer and a streaming reader (local or s3://).

A sample is a group of tar members sharing a key: `{key}.latent.npy` (fp16 moments),
`{key}.cls`, `{key}.src.txt` (the source file) and either the centre crop
(`{key}.png`, `{key}.jpg`, or `{key}.image.npy`: raw uint8 [R, R, 3], no decoding cost) or
cached encoder tokens (`{key}.feat.npy`). The writer fixes every tar header field (mtime 0,
no owner), so re-encoding the same inputs yields a byte-identical shard and checksum.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import posixpath
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np

from erw import faults, storage
from erw.errors import ErwError

MANIFEST = "manifest.json"


class DatasetError(ErwError):
    """The shards cannot be used as configured; the message says why and how to fix it."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def resolve_uri(base: str, name: str) -> str:
    """A manifest entry's location: `name` relative to the folder `base` ("../" allowed, so
    datasets can share one store of unit shards), or an absolute path or s3:// URI."""
    if storage.is_s3(name) or os.path.isabs(name):
        return name
    if storage.is_s3(base):
        bucket, key = storage.split_s3(base)
        resolved = posixpath.normpath(posixpath.join("/", key, name)).lstrip("/")
        return f"s3://{bucket}/{resolved}"
    return os.path.normpath(os.path.join(base, name))


def relative_uri(base: str, target: str) -> str:
    """The inverse of resolve_uri: target relative to the folder base when both are on the same
    file system or bucket, else target itself."""
    if storage.is_s3(base) and storage.is_s3(target):
        (bucket, key), (target_bucket, target_key) = storage.split_s3(base), storage.split_s3(target)
        if bucket == target_bucket:
            return posixpath.relpath(posixpath.join("/", target_key), posixpath.join("/", key))
        return target
    if storage.is_s3(base) or storage.is_s3(target):
        return target
    return os.path.relpath(os.path.abspath(target), os.path.abspath(base))


# --image-format -> the tar member suffix of the crop
IMAGE_MEMBERS = {"png": "png", "jpg": "jpg", "npy": "image.npy"}


def encode_crop(pixels: np.ndarray, image_format: str) -> bytes:
    """uint8 [R, R, 3] -> the bytes of an image member."""
    from PIL import Image

    if image_format == "npy":
        return npy_bytes(pixels)
    buffer = io.BytesIO()
    if image_format == "png":
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=3)
    else:
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def decode_crop(data: bytes, image_format: str) -> np.ndarray:
    """The bytes of an image member -> uint8 [R, R, 3]."""
    from PIL import Image

    if image_format == "npy":
        return load_npy(data)
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class ShardWriter:
    """Appends samples to a local tar file; close() returns (sample count, sha256, bytes)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tar = tarfile.open(self.path, "w", format=tarfile.PAX_FORMAT)
        self.count = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/' (WebDataset splits on them)")
        for suffix, data in members.items():
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> tuple[int, str, int]:
        self.tar.close()
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return self.count, digest.hexdigest(), self.path.stat().st_size


def read_tar_samples(uri: str, sha256: str | None = None, size: int | None = None) -> Iterator[dict]:
    """Stream the samples of one tar (local or s3://) as WebDataset dicts: {"__key__", suffix: bytes}.

    The stream is opened here and closed when the iteration ends or is abandoned. With sha256
    (and size), the bytes are hashed as they are read; an iteration that runs to the end
    reads the rest of the file and raises DatasetError if it is not the shard the manifest
    lists. A tar that cannot be parsed raises DatasetError naming the shard.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    with faults.shard_stream(uri, storage.open_read(uri)) as stream:
        reader = _HashingReader(stream) if sha256 else stream
        try:
            yield from group_by_keys(tar_file_expander([{"url": uri, "stream": reader}]))
        except (tarfile.TarError, EOFError, ValueError) as err:
            raise DatasetError(
                f"{uri} is not a readable tar shard ({str(err).splitlines()[0]}): it is corrupt or truncated; "
                "precompute the dataset again (or restore the shard)"
            ) from None
        if sha256:
            reader.drain()
            if reader.size != size or reader.digest.hexdigest() != sha256:
                raise DatasetError(
                    f"{uri} does not match its manifest entry ({reader.size} bytes, sha256 "
                    f"{reader.digest.hexdigest()[:12]}..., the manifest says {size} bytes, {sha256[:12]}...): "
                    "the shard was changed or corrupted; precompute the dataset again (or restore the shard)"
                )


class _HashingReader:
    """A read-only stream that hashes every byte read through it."""

    def __init__(self, stream):
        self.stream, self.digest, self.size = stream, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.digest.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_: object):
    if mode != "rb":
        raise ValueError(f"s3 shards are read-only through webdataset, got mode {mode!r}")
    return storage.open_read(url)


def register_s3_with_webdataset() -> None:
    """Let any webdataset pipeline (wds.WebDataset("s3://...")) stream S3 through boto3.

    The attribute `webdataset.gopen` is a function; import_module returns the module.
    """
    importlib.import_module("webdataset.gopen").gopen_schemes["s3"] = _gopen_s3


register_s3_with_webdataset()
