"""Image sources for the precompute job: an ImageFolder or image tar shards, local or on S3.

A source is cut into *units*, each of which becomes one latent shard: one input tar, or a
chunk of an ImageFolder. Each unit has a content key, a hash of the names, sizes, versions
(S3 ETag or local mtime) and labels of its files, read from the listing alone (no image is
opened), so a rerun over a changed source can tell which units are new and reuse the rest.

ImageFolder chunks are cut by content, not by position: files are ordered by a hash of their
path (which mixes the classes, since the streaming loader only shuffles within a bounded
buffer) and a chunk ends after a file whose path hash says so (on average every `shard_size`
files, at most MAX_UNIT_FACTOR times that). Adding or removing a file therefore changes only
the chunk it falls into, not every chunk after it, as cutting the listing at fixed positions
would. Class indices follow the sorted folder names and are part of the key: a new class
folder renumbers the classes, and every unit is encoded again.

Tar shards: samples of jpg|jpeg|png|webp|bmp plus cls (an integer); the classes are
0..max(cls). Images are decoded here and centre-cropped the way ADM/DiT do it; a file that
is not a readable image is reported as a failure, never raised.
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
# An ImageFolder chunk is cut early when it reaches this many times --shard-size files, so a
# long run of path hashes without a boundary cannot make one huge shard.
MAX_UNIT_FACTOR = 3

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
    index: int  # position in this listing's units (workers of a fan-out take index mod n)
    key: str  # content key: names, sizes, versions and labels of its inputs (hex sha256)
    files: tuple[tuple[str, int], ...] = ()  # ImageFolder: (relative path, label)
    tar: str = ""  # tar source: the input tar URI
    size: int = 0  # number of files, or bytes of the tar (for progress only)


@dataclass
class Source:
    uri: str
    kind: str  # "imagefolder" | "tars"
    units: list[Unit]
    class_names: list[str] | None  # None for tars: labels come from the cls members
    listing_sha256: str  # of names, sizes and versions: tells whether two runs saw the same input
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
        listed = {storage.join(uri, f.path): f for f in files if f.path.endswith(".tar")}
        return _tar_source(uri, list(listed), listed)
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
    chunks = content_chunks(in_class, shard_size)
    units = []
    for j, chunk in enumerate(chunks):
        entries = tuple((f.path, label_of[f.path.split("/", 1)[0]]) for f in chunk)
        key = _sha256("".join(f"{f.path}\t{label}\t{f.size}\t{f.version}\n" for f, (_, label) in zip(chunk, entries)))
        units.append(Unit(index=j, key=key, files=entries, size=len(entries)))
    return Source(uri, "imagefolder", units, class_names, _listing_sha256(in_class), len(in_class), ignored)


def content_chunks(files: list[storage.FileInfo], shard_size: int) -> list[list[storage.FileInfo]]:
    """Cut files into chunks whose boundaries depend only on each file's own path."""
    hashed = sorted((hashlib.sha256(f.path.encode()).digest(), f) for f in files)
    chunks: list[list[storage.FileInfo]] = [[]]
    for digest, f in hashed:
        chunks[-1].append(f)
        boundary = int.from_bytes(digest[-4:], "big") % shard_size == 0
        if boundary or len(chunks[-1]) >= MAX_UNIT_FACTOR * shard_size:
            chunks.append([])
    return [c for c in chunks if c]


def _tar_source(uri: str, tars: list[str], listed: dict[str, storage.FileInfo] | None = None) -> Source:
    if not tars:
        raise SourceError(f"source {uri} matches no .tar files")
    listed = listed or _list_parents(tars)
    infos = []
    for tar in tars:
        info = listed.get(tar)
        if info is None:
            raise SourceError(f"source shard {tar} does not exist")
        infos.append(storage.FileInfo(tar, info.size, info.version))
    units = [
        Unit(
            index=j,
            key=_sha256(f"tar\t{info.path.rsplit('/', 1)[-1]}\t{info.size}\t{info.version}\n"),
            tar=info.path,
            size=info.size,
        )
        for j, info in enumerate(infos)
    ]
    return Source(uri, "tars", units, None, _listing_sha256(infos), len(infos))


def _list_parents(tars: list[str]) -> dict[str, storage.FileInfo]:
    """Size and version of each tar, from one listing per parent folder (no per-file request)."""
    found = {}
    for parent in sorted({t.rsplit("/", 1)[0] for t in tars}):
        for f in storage.list_files(parent):
            if "/" not in f.path:
                found[f"{parent}/{f.path}"] = f  # the form the pattern expanded to, not a normalised path
    return found


def _expand(pattern: str) -> list[str]:
    """WebDataset's URL syntax: braces (shard-{000000..000099}.tar) and "::" between lists."""
    from webdataset.shardlists import expand_urls

    return expand_urls(pattern)


def _hidden(path: str) -> bool:
    return any(part.startswith(".") for part in path.split("/"))


def _listing_sha256(files: Iterable[storage.FileInfo]) -> str:
    return _sha256("".join(f"{f.path}\t{f.size}\t{f.version}\n" for f in files))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


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
    return np.ascontiguousarray(pixels[top : top + resolution, left : left + resolution])
