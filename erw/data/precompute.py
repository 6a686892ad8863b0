"""`erw precompute`: images -> latent moments (+ class, + crop or encoder features) in shards, incrementally.

Two locations (the same one unless precompute.cache is set):

    precompute.cache: the unit store of one set of encoding settings, shared by every dataset
        precompute.json        the settings claim, created once and atomically (If-None-Match on
                               S3, a hard link locally); a worker with other settings is refused
        units/KEY.tar          the latent shard of one source unit, named by its content key
        units/KEY.json         its done marker, written after the shard: count, sha256, failures,
                               labels, latent statistics, and the hash of the settings claim
    data.shards: one dataset
        dataset.json           the source's current units (listing, classes, unit keys)
        manifest.json          written last (by a lone worker or --merge): the current units'
                               shards, reused and new, with their sha256; a prefix without it
                               is incomplete

A unit is one source tar or a content-cut chunk of an ImageFolder (sources.py); its key
hashes the names, sizes, versions (S3 ETag, local mtime) and labels of its files. A rerun
over a source that gained, changed or lost files encodes only units whose key has no done
marker yet and reuses the other shards as they are (the same objects, the same sha256). The
new manifest lists exactly the current units, so removed files leave the dataset with their
unit; `erw gc` deletes shards that no kept manifest lists.

Worker i of n encodes the missing units whose index is i mod n. A killed worker loses at
most the shard it was writing; its partial file is removed on SIGTERM, and by the next
precompute on the machine after a SIGKILL. Memory is bounded by one batch plus the
read-ahead window.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

import numpy as np
import torch

from erw import storage
from erw.data.shards import IMAGE_MEMBERS, MANIFEST, ShardWriter, encode_crop, npy_bytes, relative_uri, resolve_uri
from erw.data.sources import BadImage, RawSample, Source, Unit, decode_image, open_source, ordered_map
from erw.errors import ErwError
from erw.config import (
    Codec,
    Config,
    DataConfig,
    ImageFormat,
    LatentNormMode,
    PrecomputeConfig,
    ShardStore,
    literal_mismatch,
)
from erw.data.codec import LatentCodec, build_codec

FORMAT_VERSION = 1
T = TypeVar("T")
SETTINGS = "precompute.json"
DATASET = "dataset.json"
UNITS = "units"
TEMP_PREFIX = "erw-precompute-"


class PrecomputeError(ErwError):
    """The precompute cannot run or cannot be merged; the message says why."""


_DATA, _ENCODING = DataConfig(), PrecomputeConfig()  # the settings' defaults, written once in erw.config


@dataclass
class PrecomputeJob:
    """One worker's job. `erw precompute` builds it from a config (`from_config`); its defaults are
    the config's, so code that builds one directly (tests, benchmarks) encodes the same way."""

    source: str
    out: str
    cache: str = _ENCODING.cache  # the unit store for these settings, shared between datasets; empty = out
    resolution: int = _DATA.resolution
    codec: Codec = _DATA.codec
    codec_weights: str = _DATA.codec_weights
    worker_index: int = 0
    num_workers: int = 1
    store: ShardStore = _ENCODING.store
    image_format: ImageFormat = _ENCODING.image_format
    latent_norm: LatentNormMode = _ENCODING.latent_norm
    batch_size: int = _ENCODING.batch_size
    shard_size: int = _ENCODING.shard_size
    encoder: str = ""  # store features: the encoder registry name
    encoder_weights: str = ""
    device: str = _ENCODING.device
    io_threads: int = 16

    @classmethod
    def from_config(cls, cfg: Config, worker_index: int = 0, num_workers: int = 1) -> PrecomputeJob:
        d, p = cfg.data, cfg.precompute
        features = p.store == "features"
        return cls(
            source=d.source,
            out=d.shards,
            cache=p.cache,
            resolution=d.resolution,
            codec=d.codec,
            codec_weights=d.codec_weights,
            worker_index=worker_index,
            num_workers=num_workers,
            store=p.store,
            image_format=p.image_format,
            latent_norm=p.latent_norm,
            batch_size=p.batch_size,
            shard_size=p.shard_size,
            encoder=cfg.encoder.name if features else "",
            encoder_weights=cfg.encoder.weights if features else "",
            device=p.device,
        )

    @property
    def cache_uri(self) -> str:
        return self.cache or self.out

    def settings(self) -> dict[str, Any]:
        """What the latent bytes of a unit depend on, besides the unit's own files."""
        return {
            "format_version": FORMAT_VERSION,
            "resolution": self.resolution,
            "codec": self.codec,
            "codec_weights": self.codec_weights,
            "latent_norm": self.latent_norm,
            "store": self.store,
            "image_format": self.image_format if self.store == "images" else None,
            "encoder": self.encoder if self.store == "features" else None,
            "encoder_weights": self.encoder_weights if self.store == "features" else None,
        }

    def problems(self) -> list[str]:
        """What the config's coercion cannot see: a job built in code, and the ranges."""
        out = []
        if not self.out:
            out.append("data.shards is required: where the shards go (a directory or s3://bucket/prefix)")
        if self.resolution < 8:
            out.append(f"data.resolution={self.resolution} is too small")
        for key, value, literal in (
            ("data.codec", self.codec, Codec),
            ("precompute.store", self.store, ShardStore),
            ("precompute.image_format", self.image_format, ImageFormat),
            ("precompute.latent_norm", self.latent_norm, LatentNormMode),
        ):
            if mismatch := literal_mismatch(value, literal):
                out.append(f"{key}={value!r} is not one of {mismatch[0]}{mismatch[1]}")
        if not 0 <= self.worker_index < self.num_workers:
            out.append(f"--worker-index {self.worker_index} must be in [0, --num-workers {self.num_workers})")
        if self.store == "features" and not self.encoder:
            out.append("precompute.store=features needs encoder.name (the encoder whose tokens are cached)")
        if self.batch_size < 1 or self.shard_size < 1:
            out.append("precompute.batch_size and precompute.shard_size must be at least 1")
        return out


@dataclass
class WorkerReport:
    shards_total: int = 0  # units owned by this worker
    shards_skipped: int = 0  # already encoded (by an earlier run, or for another dataset): reused
    shards_written: int = 0  # encoded by this run
    images: int = 0
    failures: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Plan:
    """What a precompute of `source` would do, from the listing alone (no image is read)."""

    source: Source
    cache: str
    dataset: str
    units_total: int
    units_reused: int  # already encoded under these settings: their shards are reused as they are
    units_to_encode: int
    files: int

    def summary(self) -> str:
        return (
            f"{self.files} files in {self.units_total} units: {self.units_reused} already encoded in "
            f"{self.cache}, {self.units_to_encode} to encode"
        )


def plan_precompute(job: PrecomputeJob, source: Source | None = None) -> Plan:
    """List the source and the unit store: how many units exist, how many are already encoded.

    Cheap on ImageNet-sized sources: one listing of each (names, sizes, ETags), no image read.
    Refuses a store claimed by other settings before any compute.
    """
    found = job.problems()
    if found:
        raise PrecomputeError("invalid precompute options:\n  - " + "\n  - ".join(found))
    source = source or open_source(job.source, job.shard_size)
    cache = job.cache_uri
    try:
        existing = json.loads(storage.read_bytes(storage.join(cache, SETTINGS)))
        _check_settings(cache, existing, job.settings())
    except storage.ObjectNotFound:
        pass
    done = encoded_units(cache)
    reused = sum(u.key in done for u in source.units)
    return Plan(source, cache, job.out, len(source.units), reused, len(source.units) - reused, source.num_files)


def plan_in_workspace(workspace: str, job: PrecomputeJob) -> Plan:
    """Plan a precompute into the pipeline's workspace, choosing job.cache and job.out:

        WORKSPACE/latents/CODEC-RESpx-SETTINGS/                 the unit store of these settings
        WORKSPACE/latents/CODEC-RESpx-SETTINGS/datasets/LISTING  this listing's dataset

    An unchanged source maps to the same dataset (the pipeline's cached steps stay valid); a
    changed one to a new dataset whose unchanged units are already in the store.
    """
    settings = hashlib.sha256(json.dumps(job.settings(), sort_keys=True).encode()).hexdigest()[:16]
    job.cache = storage.join(workspace, "latents", f"{job.codec}-{job.resolution}px-{settings}")
    source = open_source(job.source, job.shard_size)
    listing = hashlib.sha256(f"{source.listing_sha256}\t{job.shard_size}".encode()).hexdigest()[:16]
    job.out = storage.join(job.cache, "datasets", listing)
    return plan_precompute(job, source)


# ---------------------------------------------------------------------------------------------
# One worker.


def run_worker(job: PrecomputeJob, progress: bool = True) -> WorkerReport:
    remove_stale_temp_dirs()
    plan = plan_precompute(job)
    source, cache = plan.source, plan.cache
    settings_hash = claim_settings(cache, job.settings())
    write_dataset(job, source, settings_hash)
    done = encoded_units(cache)
    mine = [u for u in source.units if u.index % job.num_workers == job.worker_index]
    todo = [u for u in mine if u.key not in done]
    report = WorkerReport(shards_total=len(mine), shards_skipped=len(mine) - len(todo))
    name = f"worker {job.worker_index}/{job.num_workers}"
    print(
        f"{name}: {len(mine)} of {len(source.units)} units are mine: {report.shards_skipped} already encoded "
        f"(reused), {len(todo)} to encode",
        flush=True,
    )
    if source.ignored:
        shown = ", ".join(source.ignored[:5]) + (" ..." if len(source.ignored) > 5 else "")
        print(f"{name}: ignoring {len(source.ignored)} files outside the class folders: {shown}", flush=True)
    if todo:
        with _terminate_as_exit():
            _encode_units(job, source, todo, report, name, progress, settings_hash)
    if job.num_workers == 1:  # a lone worker is also the last one: it writes the manifest
        merge(job.out)
    return report


def _encode_units(
    job: PrecomputeJob,
    source: Source,
    todo: list[Unit],
    report: WorkerReport,
    name: str,
    progress: bool,
    settings_hash: str,
) -> None:
    if job.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(job.device)
    torch.backends.cudnn.benchmark = True  # one input shape throughout
    codec = build_codec(job.codec, job.codec_weights, device=device)
    encoder = _load_encoder(job, device) if job.store == "features" else None
    if job.resolution % codec.downsample:
        raise PrecomputeError(
            f"data.resolution={job.resolution} is not a multiple of the codec's downsampling {codec.downsample}"
        )

    from tqdm import tqdm

    total = sum(u.size for u in todo) if source.kind == "imagefolder" else None
    started = time.perf_counter()
    with (
        ThreadPoolExecutor(job.io_threads) as pool,
        tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{os.getpid()}-") as tmp,
        tqdm(
            total=total, unit="img", desc=name, disable=not progress, mininterval=1 if sys.stderr.isatty() else 30
        ) as bar,
    ):
        for unit in todo:
            marker = encode_unit(unit, source, codec, encoder, job, device, pool, Path(tmp), bar, settings_hash)
            report.shards_written += 1
            report.images += marker["count"]
            report.failures += len(marker["failures"])
            bar.write(
                f"{name}: unit {unit.index} ({unit.key[:12]}) {marker['count']} samples, "
                f"{len(marker['failures'])} failures"
            )
    report.seconds = time.perf_counter() - started
    print(
        f"{name}: encoded {report.shards_written} units ({report.shards_skipped} reused), {report.images} images, "
        f"{report.failures} failures, {report.images_per_second:.1f} images/s",
        flush=True,
    )


def encode_unit(
    unit: Unit,
    source: Source,
    codec: LatentCodec,
    encoder: torch.nn.Module | None,
    job: PrecomputeJob,
    device: torch.device,
    pool: ThreadPoolExecutor,
    tmp: Path,
    bar: Any,
    settings_hash: str,
) -> dict[str, Any]:
    """Encode one unit into a shard, upload it, then write its done marker (returned)."""
    cache = job.cache_uri
    writer = ShardWriter(tmp / unit_shard(unit.key))
    stats = LatentStats(codec.latent_channels)
    failures: list[dict[str, str]] = []
    labels: Counter[int] = Counter()
    content = hashlib.sha256()  # over (name, sha256 of bytes): the source content this shard saw
    feat_shape = None
    position = 0
    # Reading and decoding run ahead in the pool (about two batches) while a batch is encoded.
    decoded = ordered_map(
        lambda raw: (raw, *_decode(raw, job.resolution)), source.read(unit, pool), pool, 2 * job.batch_size
    )
    for batch in _chunks(decoded, job.batch_size):
        good = []
        for raw, digest, pixels_or_reason in batch:
            key = f"{unit.key[:16]}_{position:06d}"  # unique in every dataset that lists this unit
            position += 1
            content.update(f"{raw.name}\t{digest}\n".encode())
            if isinstance(pixels_or_reason, str):
                failures.append({"file": raw.name, "reason": pixels_or_reason})
            else:
                good.append((key, raw, pixels_or_reason))
        bar.update(len(batch))
        if not good:
            continue
        pixels = torch.from_numpy(np.stack([p for _, _, p in good])).permute(0, 3, 1, 2).to(device)
        moments = codec.encode(pixels).cpu()
        stats.add(moments)
        feats = None
        if encoder is not None:
            with torch.no_grad():
                feats = encoder(pixels).half().cpu()
            feat_shape = list(feats.shape[1:])

        def members(j: int, good=good, moments=moments, feats=feats) -> dict[str, bytes]:
            _, raw, crop = good[j]
            out = {"cls": str(raw.label).encode(), "latent.npy": npy_bytes(moments[j].numpy())}
            if feats is not None:
                out["feat.npy"] = npy_bytes(feats[j].numpy())
            else:
                out[IMAGE_MEMBERS[job.image_format]] = encode_crop(crop, job.image_format)
            out["src.txt"] = raw.name.encode()
            return out

        for (key, raw, _), sample in zip(good, pool.map(members, range(len(good)))):
            writer.write(key, sample)
            labels[raw.label] += 1
    count, sha256, size = writer.close()
    if count:
        storage.upload_file(writer.path, storage.join(cache, UNITS, unit_shard(unit.key)))
    writer.path.unlink()
    marker = {
        "unit": unit.key,
        "shard": unit_shard(unit.key) if count else None,
        "count": count,
        "sha256": sha256 if count else None,
        "bytes": size if count else 0,
        "failures": failures,
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "stats": stats.to_json(),
        "content_sha256": content.hexdigest(),
        "codec": codec.describe(),
        "feat_shape": feat_shape,
        "settings_sha256": settings_hash,
    }
    storage.write_bytes(_marker_uri(cache, unit.key), json.dumps(marker).encode())
    return marker


class Terminated(SystemExit):
    """SIGTERM during encoding: unwinds like an exit, so the temp folder is removed on the way out."""


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """Turn SIGTERM (a preempted pod, a cancelled step) into Terminated while encoding."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def handler(signum: int, _frame: Any) -> None:
        print(
            "precompute: terminated; the partial shard is removed, finished units are kept: rerun to continue",
            file=sys.stderr,
            flush=True,
        )
        raise Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def remove_stale_temp_dirs() -> list[str]:
    """Remove the temp folders of precompute processes that are gone (killed with SIGKILL)."""
    removed = []
    for path in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*"):
        pid = path.name[len(TEMP_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _decode(raw: RawSample, resolution: int) -> tuple[str, np.ndarray | str]:
    """(sha256 of the bytes, the crop or the reason it is unusable); runs in a thread."""
    if raw.data is None:
        return "", raw.problem
    digest = hashlib.sha256(raw.data).hexdigest()
    try:
        return digest, decode_image(raw.data, resolution)
    except BadImage as err:
        return digest, str(err)


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _load_encoder(job: PrecomputeJob, device: torch.device) -> torch.nn.Module:
    from erw.config import EncoderConfig
    from erw.models.encoders import load_encoder

    return load_encoder(EncoderConfig(name=job.encoder, weights=job.encoder_weights), job.resolution, device)


class LatentStats:
    """Running per-channel sums of the posterior mean and variance, in float64.

    Channel variance of a sampled latent = variance of the means + mean of the posterior variance.
    """

    def __init__(self, channels: int):
        self.sum = np.zeros(channels)
        self.sum_sq = np.zeros(channels)
        self.var_sum = np.zeros(channels)
        self.elements = 0

    def add(self, moments: torch.Tensor) -> None:
        mean, std = moments.double().chunk(2, dim=1)
        self.sum += mean.sum(dim=(0, 2, 3)).numpy()
        self.sum_sq += (mean**2).sum(dim=(0, 2, 3)).numpy()
        self.var_sum += (std**2).sum(dim=(0, 2, 3)).numpy()
        self.elements += mean.shape[0] * mean.shape[2] * mean.shape[3]

    def to_json(self) -> dict[str, Any]:
        return {
            "sum": self.sum.tolist(),
            "sum_sq": self.sum_sq.tolist(),
            "var_sum": self.var_sum.tolist(),
            "elements": self.elements,
        }

    @staticmethod
    def combine(parts: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
        n = sum(p["elements"] for p in parts)
        total = {k: np.sum([p[k] for p in parts], axis=0) for k in ("sum", "sum_sq", "var_sum")}
        mean = total["sum"] / n
        var = total["sum_sq"] / n - mean**2 + total["var_sum"] / n
        return mean.tolist(), np.sqrt(np.maximum(var, 0.0)).tolist()


# ---------------------------------------------------------------------------------------------
# The settings claim, the dataset's unit list and the done markers.


def claim_settings(cache: str, settings: dict[str, Any]) -> str:
    """Claim `cache` for these settings, or check the claim there; returns the claim's hash.

    The claim is created with a conditional write, so of two workers with different settings
    racing on an empty store exactly one wins and the other is refused (never a mix).
    """
    uri = storage.join(cache, SETTINGS)
    data = json.dumps(settings, indent=1, sort_keys=True).encode()
    if not storage.write_if(uri, data, None):
        data = storage.read_bytes(uri)
        _check_settings(cache, json.loads(data), settings)
    return hashlib.sha256(data).hexdigest()


def _check_settings(cache: str, existing: dict[str, Any], settings: dict[str, Any]) -> None:
    keys = sorted(set(existing) | set(settings))
    differ = [
        f"{k}: {existing.get(k)!r} there, {settings.get(k)!r} now" for k in keys if existing.get(k) != settings.get(k)
    ]
    if differ:
        raise PrecomputeError(
            f"{cache} already holds latents encoded with other settings:\n  - "
            + "\n  - ".join(differ)
            + "\nUse another --cache (or --out) for these settings, or delete "
            + cache
            + " to start over"
        )


def write_dataset(job: PrecomputeJob, source: Source, settings_hash: str) -> None:
    """Record the source's current units in --out: what the merge will list."""
    dataset = {
        "format_version": FORMAT_VERSION,
        "source": source.uri,
        "source_kind": source.kind,
        "listing_sha256": source.listing_sha256,
        "num_files": source.num_files,
        "shard_size": job.shard_size,
        "class_names": source.class_names,
        "cache": relative_uri(job.out, job.cache_uri),
        "settings_sha256": settings_hash,
        "units": [u.key for u in source.units],
    }
    uri = storage.join(job.out, DATASET)
    try:
        if json.loads(storage.read_bytes(uri)) == dataset:
            return  # another worker of the fan-out wrote the same
    except storage.ObjectNotFound:
        pass
    storage.write_bytes(uri, json.dumps(dataset, indent=1).encode())


def unit_shard(key: str) -> str:
    return f"{key}.tar"


def _marker_uri(cache: str, key: str) -> str:
    return storage.join(cache, UNITS, f"{key}.json")


def encoded_units(cache: str) -> set[str]:
    """Keys of the units whose shard is done (one listing of the store)."""
    return {n[: -len(".json")] for n in storage.list_dir(storage.join(cache, UNITS)) if n.endswith(".json")}


# ---------------------------------------------------------------------------------------------
# The merge: checks that every current unit is done and writes manifest.json last.


def merge(out: str, num_workers: int | None = None) -> dict[str, Any]:
    try:
        dataset = json.loads(storage.read_bytes(storage.join(out, DATASET)))
    except storage.ObjectNotFound:
        raise PrecomputeError(f"{out} holds no {DATASET}: run the precompute workers before --merge") from None
    cache = resolve_uri(out, dataset["cache"])
    units: list[str] = dataset["units"]
    done = encoded_units(cache)
    missing = [j for j, key in enumerate(units) if key not in done]
    if missing:
        owners = sorted({j % num_workers for j in missing}) if num_workers else None
        rerun = (
            f"rerun --worker-index {', '.join(map(str, owners))} of {num_workers}" if owners else "rerun the workers"
        )
        shown = ", ".join(units[j][:12] for j in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise PrecomputeError(f"{len(missing)} of {len(units)} units are not encoded yet ({shown}): {rerun}")
    with ThreadPoolExecutor(16) as pool:
        markers = list(pool.map(lambda key: json.loads(storage.read_bytes(_marker_uri(cache, key))), units))
    claim = hashlib.sha256(storage.read_bytes(storage.join(cache, SETTINGS))).hexdigest()
    foreign = [m["unit"][:12] for m in markers if m.get("settings_sha256") != claim]
    if foreign:
        raise PrecomputeError(
            f"units {', '.join(foreign[:10])} in {cache} were encoded under other settings than its {SETTINGS}; "
            f"delete their {UNITS}/*.json markers and rerun the workers"
        )
    present = set(storage.list_dir(storage.join(cache, UNITS)))
    lost = [m["shard"] for m in markers if m["shard"] and m["shard"] not in present]
    if lost:
        raise PrecomputeError(
            f"shards marked done are missing from {cache}: {', '.join(lost[:10])}; delete their "
            f"{UNITS}/*.json markers and rerun the workers"
        )
    settings = json.loads(storage.read_bytes(storage.join(cache, SETTINGS)))
    manifest = build_manifest(dataset, settings, markers, shard_prefix=relative_uri(out, storage.join(cache, UNITS)))
    storage.write_bytes(storage.join(out, MANIFEST), json.dumps(manifest, indent=1).encode())
    print(
        f"merged {len(manifest['shards'])} shards: {manifest['num_samples']} samples, {manifest['num_classes']} classes, "
        f"{manifest['failures']['count']} failures -> {storage.join(out, MANIFEST)}",
        flush=True,
    )
    return manifest


def build_manifest(
    dataset: dict[str, Any], settings: dict[str, Any], markers: list[dict[str, Any]], shard_prefix: str
) -> dict[str, Any]:
    filled = [m for m in markers if m["count"]]
    if not filled:
        raise PrecomputeError(f"no usable image in {dataset['source']}: every file failed (see {UNITS}/*.json)")
    labels: Counter[int] = Counter()
    for m in markers:
        labels.update({int(k): v for k, v in m["labels"].items()})
    class_names = dataset["class_names"] or [str(i) for i in range(max(labels) + 1)]
    mean, std = LatentStats.combine([m["stats"] for m in filled])
    codec = dict(filled[0]["codec"], weights=settings["codec_weights"], normalization=settings["latent_norm"])
    latent_size = settings["resolution"] // codec["downsample"]
    fingerprint = hashlib.sha256("".join(m["content_sha256"] for m in markers).encode()).hexdigest()
    failures = [f for m in markers for f in m["failures"]]
    return {
        "format": "erw-latent-shards",
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {
            "uri": dataset["source"],
            "kind": dataset["source_kind"],
            "num_files": dataset["num_files"],
            "content_sha256": fingerprint,
            "listing_sha256": dataset["listing_sha256"],
        },
        "resolution": settings["resolution"],
        "codec": codec,
        "latent_shape": [2 * codec["latent_channels"], latent_size, latent_size],
        "latent_stats": {"mean": mean, "std": std},
        "store": settings["store"],
        "image_format": settings["image_format"],
        "encoder": settings["encoder"],
        "feat_shape": filled[0]["feat_shape"],
        "num_classes": len(class_names),
        "class_names": class_names,
        "class_counts": [labels.get(i, 0) for i in range(len(class_names))],
        "num_samples": sum(m["count"] for m in filled),
        # name: relative to this manifest's folder ("../" when the unit store is elsewhere)
        "shards": [
            {
                "name": f"{shard_prefix}/{m['shard']}",
                "unit": m["unit"],
                "count": m["count"],
                "sha256": m["sha256"],
                "bytes": m["bytes"],
            }
            for m in filled
        ],
        "failures": {"count": len(failures), "files": failures},
    }
