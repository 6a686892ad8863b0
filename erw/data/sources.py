"""Image sources for the precompute job: an ImageFolder or image tar shards, local or on S3.

A source is cut into *units*, each of which becomes one output shard: for an ImageFolder a
unit is `shard_size` files, for tar shards it is one input tar. The cut depends only on
the listing, so every worker of a fan-out computes the same units and takes a disjoint
subset of them. Images are decoded here and centre-cropped the way ADM/DiT do it; a file
that is not a readable image is reported as a failure, never raised.

ImageFolder: every file below a class folder is an input (hidden files excepted); class
indices follow the sorted folder names. Tar shards: samples of jpg|jpeg|png|webp|bmp plus
cls (an integer); the classes are 0..max(cls).
"""
from __future__ import annotations

import hashlib
import io
import re
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
from PIL import Image

from erw import storage
from erw.data.shards import read_tar_samples
from erw.errors import ErwError

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp")
LABEL_SUFFIXES = ("cls", "class", "label")
# Files are shuffled (with this fixed seed) before being cut into shards, so that every shard
# holds a mix of classes: a streaming loader only shuffles within a bounded buffer.
SHARD_ORDER_SEED = 0

T = TypeVar("T")
R = TypeVar("R")


class SourceError(ErwError):
    """The image source cannot be used; the message says why."""


class BadImage(Exception):
    """One input is not a usable image; the reason ends up in the manifest."""


@dataclass(frozen=True)
class RawSample:
    name: str  # where it came from: "class/file.jpg" or "tarname.tar:key"
    label: int | None
    data: bytes | None
    problem: str = ""  # set when the sample cannot be used (no image member, bad label, ...)


@dataclass(frozen=True)
class Unit:
    index: int  # output shard number
    files: tuple[tuple[str, int], ...] = ()  # ImageFolder: (relative path, label)
    tar: str = ""  # tar source: the input tar URI
    size: int = 0  # number of files, or bytes of the tar (for progress only)


@dataclass
class Source:
    uri: str
    kind: str  # "imagefolder" | "tars"
    units: list[Unit]
    class_names: list[str] | None  # None for tars: labels come from the cls members
    listing_sha256: str  # of names and sizes: tells whether two runs saw the same input
    num_files: int = 0
    ignored: list[str] = field(default_factory=list)  # ImageFolder: files beside the class folders

    def read(self, unit: Unit, executor: Executor, prefetch: int = 64) -> Iterator[RawSample]:
        """The raw samples of one unit, in a fixed order; S3 reads overlap through executor."""
        if self.kind == "tars":
            yield from _read_tar(unit.tar)
            return

        def fetch(entry: tuple[str, int]) -> RawSample:
            path, label = entry
            return RawSample(path, label, storage.read_bytes(storage.join(self.uri, path)))

        yield from ordered_map(fetch, unit.files, executor, prefetch)


def open_source(uri: str, shard_size: int) -> Source:
    """List the source (one listing, no reads) and cut it into units."""
    if not uri:
        raise SourceError("no source given: pass --source DIR_OR_URI (an ImageFolder or a directory of .tar shards)")
    if uri.endswith(".tar") or "{" in uri or "::" in uri:
        return _tar_source(uri, _expand(uri))
    try:
        files = storage.list_files(uri)
    except storage.ObjectNotFound:
        files = []
    if not files:
        raise SourceError(f"source {uri} does not exist or holds no files")
    if all("/" not in f.path for f in files) and any(f.path.endswith(".tar") for f in files):
        tars = [storage.join(uri, f.path) for f in files if f.path.endswith(".tar")]
        return _tar_source(uri, tars, {f.path: f.size for f in files})
    return _image_folder(uri, files, shard_size)


def _image_folder(uri: str, files: list[storage.FileInfo], shard_size: int) -> Source:
    in_class = [f for f in files if "/" in f.path and not _hidden(f.path)]
    ignored = [f.path for f in files if "/" not in f.path]
    if not in_class:
        raise SourceError(
            f"source {uri} has no class folders: an ImageFolder holds one sub-folder per class "
            "(e.g. train/cat/001.jpg), or pass a directory of .tar shards"
        )
    class_names = sorted({f.path.split("/", 1)[0] for f in in_class})
    label_of = {name: i for i, name in enumerate(class_names)}
    entries = [(f.path, label_of[f.path.split("/", 1)[0]]) for f in in_class]  # sorted by path
    order = np.random.default_rng(SHARD_ORDER_SEED).permutation(len(entries))
    shuffled = [entries[i] for i in order]
    units = [
        Unit(index=j, files=tuple(shuffled[start:start + shard_size]), size=len(shuffled[start:start + shard_size]))
        for j, start in enumerate(range(0, len(shuffled), shard_size))
    ]
    return Source(uri, "imagefolder", units, class_names, _listing_sha256(in_class), len(in_class), ignored)


def _tar_source(uri: str, tars: list[str], sizes: dict[str, int] | None = None) -> Source:
    if not tars:
        raise SourceError(f"source {uri} matches no .tar files")
    infos = []
    for tar in tars:
        name = tar.rsplit("/", 1)[-1]
        size = sizes.get(name) if sizes else None
        if size is None:
            if not storage.exists(tar):
                raise SourceError(f"source shard {tar} does not exist")
            size = -1  # unknown without a listing; the name still identifies it
        infos.append(storage.FileInfo(tar, size))
    units = [Unit(index=j, tar=info.path, size=max(info.size, 0)) for j, info in enumerate(infos)]
    return Source(uri, "tars", units, None, _listing_sha256(infos), len(infos))


def _expand(pattern: str) -> list[str]:
    """WebDataset's URL syntax: braces (shard-{000000..000099}.tar) and "::" between lists."""
    from webdataset.shardlists import expand_urls

    return expand_urls(pattern)


def _hidden(path: str) -> bool:
    return any(part.startswith(".") for part in path.split("/"))


def _listing_sha256(files: Iterable[storage.FileInfo]) -> str:
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.path}\t{f.size}\n".encode())
    return digest.hexdigest()


def _read_tar(tar: str) -> Iterator[RawSample]:
    tar_name = tar.rsplit("/", 1)[-1]
    for sample in read_tar_samples(tar):
        name = f"{tar_name}:{sample['__key__']}"
        image_key = next((k for k in IMAGE_SUFFIXES if k in sample), None)
        label_key = next((k for k in LABEL_SUFFIXES if k in sample), None)
        if image_key is None:
            yield RawSample(name, None, None, f"no image member (expected one of {', '.join(IMAGE_SUFFIXES)})")
            continue
        if label_key is None:
            yield RawSample(name, None, None, "no class label member (expected .cls)")
            continue
        text = sample[label_key].decode("utf-8", "replace").strip()
        if not re.fullmatch(r"\d+", text):
            yield RawSample(name, None, None, f"class label {text[:20]!r} is not a non-negative integer")
            continue
        yield RawSample(name, int(text), sample[image_key])


def ordered_map(fn: Callable[[T], R], items: Iterable[T], executor: Executor, window: int) -> Iterator[R]:
    """executor.map with at most `window` calls in flight, so memory stays bounded."""
    pending: deque = deque()
    for item in items:
        pending.append(executor.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# ---------------------------------------------------------------------------------------------
# Decoding and the ADM centre crop.


def decode_image(data: bytes, resolution: int) -> np.ndarray:
    """Bytes of any PIL-readable image -> uint8 [resolution, resolution, 3], or BadImage."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode now: a truncated file fails here, not later
            rgb = image.convert("RGB")
    except Image.DecompressionBombError as err:
        raise BadImage(f"image too large: {err}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise BadImage(f"not a readable image: {err}") from None
    return center_crop_adm(rgb, resolution)


def center_crop_adm(image: Image.Image, resolution: int) -> np.ndarray:
    """The centre crop of ADM (and DiT/REPA after it): box-filter halvings while the short
    side is at least twice the target (cheap anti-aliasing), a bicubic resize of the short
    side to the target, then the central square."""
    while min(image.size) >= 2 * resolution:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    pixels = np.asarray(image)
    top = (pixels.shape[0] - resolution) // 2
    left = (pixels.shape[1] - resolution) // 2
    return np.ascontiguousarray(pixels[top:top + resolution, left:left + resolution])
