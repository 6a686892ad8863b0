"""`erw precompute`: images -> latent moments (+ class, + crop or encoder features) in shards.

Layout of the output prefix:

    precompute.json          the plan: source listing, resolution, codec, ... (every worker
                             writes or checks it, so reruns with other settings are refused)
    shard-000000.tar ...     one shard per unit of the source (see sources.py)
    _progress/shard-000000.json
                             done marker of a shard, written after its upload: count,
                             sha256, failures, label counts, latent statistics
    manifest.json            written last by `--merge`; a prefix without it is incomplete

Worker i of n encodes the units whose index is i mod n. A rerun skips every unit that
has a done marker and redoes the rest from scratch, so a killed worker loses at most the
shard it was writing. Memory is bounded by one batch plus the read-ahead window.
"""
from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

import numpy as np
import torch

from erw import storage
from erw.data.shards import IMAGE_MEMBERS, MANIFEST, ShardWriter, encode_crop, npy_bytes, shard_name
from erw.data.sources import BadImage, RawSample, Source, Unit, decode_image, open_source, ordered_map
from erw.errors import ErwError
from erw.data.codec import CODECS, NORMALIZATIONS, LatentCodec, build_codec

FORMAT_VERSION = 1
T = TypeVar("T")
PLAN = "precompute.json"
PROGRESS = "_progress"
STORES = ("images", "features")


class PrecomputeError(ErwError):
    """The precompute cannot run or cannot be merged; the message says why."""


@dataclass
class PrecomputeJob:
    source: str
    out: str
    resolution: int = 256
    codec: str = "sd-vae-ft-ema"
    codec_weights: str = ""
    worker_index: int = 0
    num_workers: int = 1
    store: str = "images"  # images: keep the crop (for online encoder targets) | features: encoder tokens
    image_format: str = "png"  # png | jpg (lossy, smallest) | npy (raw pixels, no decoding in the loader)
    latent_norm: str = "scale"  # scale: latent * scaling_factor | channel: per-channel (latent - mean) / std
    batch_size: int = 64
    shard_size: int = 1000
    encoder: str = ""  # --store features: the encoder registry name
    encoder_weights: str = ""
    device: str = "auto"
    io_threads: int = 16

    def problems(self) -> list[str]:
        out = []
        if not self.out:
            out.append("--out is required: where the shards go (a directory or s3://bucket/prefix)")
        if self.resolution < 8:
            out.append(f"--resolution {self.resolution} is too small")
        if self.codec not in CODECS:
            out.append(f"--codec {self.codec!r} is not one of {', '.join(CODECS)}")
        if not 0 <= self.worker_index < self.num_workers:
            out.append(f"--worker-index {self.worker_index} must be in [0, --num-workers {self.num_workers})")
        if self.store not in STORES:
            out.append(f"--store {self.store!r} must be one of {', '.join(STORES)}")
        if self.store == "features" and not self.encoder:
            out.append("--store features needs --encoder NAME (the encoder whose tokens are cached)")
        if self.image_format not in IMAGE_MEMBERS:
            out.append(f"--image-format {self.image_format!r} must be one of {', '.join(IMAGE_MEMBERS)}")
        if self.latent_norm not in NORMALIZATIONS:
            out.append(f"--latent-norm {self.latent_norm!r} must be one of {', '.join(NORMALIZATIONS)}")
        if self.batch_size < 1 or self.shard_size < 1:
            out.append("--batch-size and --shard-size must be at least 1")
        return out


@dataclass
class WorkerReport:
    shards_total: int = 0  # units owned by this worker
    shards_skipped: int = 0  # already complete before this run
    shards_written: int = 0
    images: int = 0
    failures: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# One worker.


def run_worker(job: PrecomputeJob, progress: bool = True) -> WorkerReport:
    found = job.problems()
    if found:
        raise PrecomputeError("invalid precompute options:\n  - " + "\n  - ".join(found))
    source = open_source(job.source, job.shard_size)
    plan = make_plan(job, source)
    write_or_check_plan(job.out, plan)
    done = completed_units(job.out)
    mine = [u for u in source.units if u.index % job.num_workers == job.worker_index]
    todo = [u for u in mine if u.index not in done]
    report = WorkerReport(shards_total=len(mine), shards_skipped=len(mine) - len(todo))
    name = f"worker {job.worker_index}/{job.num_workers}"
    print(f"{name}: {len(mine)} of {len(source.units)} shards are mine, {report.shards_skipped} already done", flush=True)
    if source.ignored:
        shown = ", ".join(source.ignored[:5]) + (" ..." if len(source.ignored) > 5 else "")
        print(f"{name}: ignoring {len(source.ignored)} files outside the class folders: {shown}", flush=True)
    if todo:
        _encode_units(job, source, todo, report, name, progress)
    if job.num_workers == 1:  # a lone worker is also the last one: it writes the manifest
        merge(job.out)
    return report


def _encode_units(
    job: PrecomputeJob, source: Source, todo: list[Unit], report: WorkerReport, name: str, progress: bool
) -> None:
    if job.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(job.device)
    torch.backends.cudnn.benchmark = True  # one input shape throughout
    codec = build_codec(job.codec, job.codec_weights, device=device)
    encoder = _load_encoder(job, device) if job.store == "features" else None
    if job.resolution % codec.downsample:
        raise PrecomputeError(f"--resolution {job.resolution} is not a multiple of the codec's downsampling {codec.downsample}")

    from tqdm import tqdm

    total = sum(u.size for u in todo) if source.kind == "imagefolder" else None
    started = time.perf_counter()
    with (
        ThreadPoolExecutor(job.io_threads) as pool,
        tempfile.TemporaryDirectory(prefix="erw-precompute-") as tmp,
        tqdm(total=total, unit="img", desc=name, disable=not progress, mininterval=1 if sys.stderr.isatty() else 30) as bar,
    ):
        for unit in todo:
            marker = encode_unit(unit, source, codec, encoder, job, device, pool, Path(tmp), bar)
            report.shards_written += 1
            report.images += marker["count"]
            report.failures += len(marker["failures"])
            bar.write(f"{name}: {shard_name(unit.index)} {marker['count']} samples, {len(marker['failures'])} failures")
    report.seconds = time.perf_counter() - started
    print(
        f"{name}: wrote {report.shards_written} shards ({report.shards_skipped} were done), {report.images} images, "
        f"{report.failures} failures, {report.images_per_second:.1f} images/s",
        flush=True,
    )


def encode_unit(
    unit: Unit, source: Source, codec: LatentCodec, encoder: torch.nn.Module | None, job: PrecomputeJob,
    device: torch.device, pool: ThreadPoolExecutor, tmp: Path, bar: Any,
) -> dict[str, Any]:
    """Encode one unit into a shard, upload it, then write its done marker (returned)."""
    writer = ShardWriter(tmp / shard_name(unit.index))
    stats = LatentStats(codec.latent_channels)
    failures: list[dict[str, str]] = []
    labels: Counter[int] = Counter()
    content = hashlib.sha256()  # over (name, sha256 of bytes): the source content this shard saw
    feat_shape = None
    position = 0
    # Reading and decoding run ahead in the pool (about two batches) while a batch is encoded.
    decoded = ordered_map(lambda raw: (raw, *_decode(raw, job.resolution)), source.read(unit, pool), pool,
                          2 * job.batch_size)
    for batch in _chunks(decoded, job.batch_size):
        good = []
        for raw, digest, pixels_or_reason in batch:
            key = f"{unit.index:06d}_{position:06d}"
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

        def members(j: int) -> dict[str, bytes]:
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
        storage.upload_file(writer.path, storage.join(job.out, shard_name(unit.index)))
    writer.path.unlink()
    marker = {
        "index": unit.index, "shard": shard_name(unit.index) if count else None, "count": count,
        "sha256": sha256 if count else None, "bytes": size if count else 0, "failures": failures,
        "labels": {str(k): v for k, v in sorted(labels.items())}, "stats": stats.to_json(),
        "content_sha256": content.hexdigest(), "codec": codec.describe(), "feat_shape": feat_shape,
    }
    storage.write_bytes(_marker_uri(job.out, unit.index), json.dumps(marker).encode())
    return marker


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
        return {"sum": self.sum.tolist(), "sum_sq": self.sum_sq.tolist(), "var_sum": self.var_sum.tolist(), "elements": self.elements}

    @staticmethod
    def combine(parts: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
        n = sum(p["elements"] for p in parts)
        total = {k: np.sum([p[k] for p in parts], axis=0) for k in ("sum", "sum_sq", "var_sum")}
        mean = total["sum"] / n
        var = total["sum_sq"] / n - mean**2 + total["var_sum"] / n
        return mean.tolist(), np.sqrt(np.maximum(var, 0.0)).tolist()


# ---------------------------------------------------------------------------------------------
# The plan and the done markers.


def make_plan(job: PrecomputeJob, source: Source) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION, "source": source.uri, "source_kind": source.kind,
        "listing_sha256": source.listing_sha256, "num_files": source.num_files,
        "num_shards": len(source.units), "shard_size": job.shard_size if source.kind == "imagefolder" else None,
        "class_names": source.class_names, "resolution": job.resolution, "codec": job.codec,
        "codec_weights": job.codec_weights, "latent_norm": job.latent_norm, "store": job.store,
        "image_format": job.image_format if job.store == "images" else None,
        "encoder": job.encoder if job.store == "features" else None,
    }


def write_or_check_plan(out: str, plan: dict[str, Any]) -> None:
    """Write the plan, or refuse to mix shards made under a different one into `out`."""
    uri = storage.join(out, PLAN)
    try:
        existing = json.loads(storage.read_bytes(uri))
    except storage.ObjectNotFound:
        storage.write_bytes(uri, json.dumps(plan, indent=1).encode())
        return
    differ = [f"{k}: {existing.get(k)!r} there, {plan[k]!r} now" for k in plan if existing.get(k) != plan[k]]
    if differ:
        raise PrecomputeError(
            f"{out} already holds a precompute made with other settings or another source listing:\n  - "
            + "\n  - ".join(differ)
            + f"\nUse a fresh --out, or delete {out} to start over"
        )


def _marker_uri(out: str, index: int) -> str:
    return storage.join(out, PROGRESS, shard_name(index).replace(".tar", ".json"))


def completed_units(out: str) -> set[int]:
    names = storage.list_dir(storage.join(out, PROGRESS))
    return {int(n[len("shard-"):-len(".json")]) for n in names if n.startswith("shard-") and n.endswith(".json")}


# ---------------------------------------------------------------------------------------------
# The merge: checks that every shard is done and writes manifest.json last.


def merge(out: str, num_workers: int | None = None) -> dict[str, Any]:
    try:
        plan = json.loads(storage.read_bytes(storage.join(out, PLAN)))
    except storage.ObjectNotFound:
        raise PrecomputeError(f"{out} holds no {PLAN}: run the precompute workers before --merge") from None
    done = completed_units(out)
    missing = [j for j in range(plan["num_shards"]) if j not in done]
    if missing:
        owners = sorted({j % num_workers for j in missing}) if num_workers else None
        rerun = f"rerun --worker-index {', '.join(map(str, owners))} of {num_workers}" if owners else "rerun the workers"
        shown = ", ".join(shard_name(j) for j in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise PrecomputeError(f"{len(missing)} of {plan['num_shards']} shards are not finished ({shown}): {rerun}")
    with ThreadPoolExecutor(16) as pool:
        markers = list(pool.map(lambda j: json.loads(storage.read_bytes(_marker_uri(out, j))), range(plan["num_shards"])))
    present = set(storage.list_dir(out))
    lost = [m["shard"] for m in markers if m["shard"] and m["shard"] not in present]
    if lost:
        raise PrecomputeError(f"shards marked done are missing from {out}: {', '.join(lost[:10])}; delete their "
                              f"{PROGRESS}/ markers and rerun the workers")
    manifest = build_manifest(plan, markers)
    storage.write_bytes(storage.join(out, MANIFEST), json.dumps(manifest, indent=1).encode())
    print(
        f"merged {len(manifest['shards'])} shards: {manifest['num_samples']} samples, {manifest['num_classes']} classes, "
        f"{manifest['failures']['count']} failures -> {storage.join(out, MANIFEST)}",
        flush=True,
    )
    return manifest


def build_manifest(plan: dict[str, Any], markers: list[dict[str, Any]]) -> dict[str, Any]:
    filled = [m for m in markers if m["count"]]
    if not filled:
        raise PrecomputeError(f"no usable image in {plan['source']}: every file failed (see {PROGRESS}/*.json)")
    labels: Counter[int] = Counter()
    for m in markers:
        labels.update({int(k): v for k, v in m["labels"].items()})
    class_names = plan["class_names"] or [str(i) for i in range(max(labels) + 1)]
    mean, std = LatentStats.combine([m["stats"] for m in filled])
    codec = dict(filled[0]["codec"], weights=plan["codec_weights"], normalization=plan["latent_norm"])
    latent_size = plan["resolution"] // codec["downsample"]
    fingerprint = hashlib.sha256("".join(m["content_sha256"] for m in markers).encode()).hexdigest()
    failures = [f for m in markers for f in m["failures"]]
    return {
        "format": "erw-latent-shards", "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"uri": plan["source"], "kind": plan["source_kind"], "num_files": plan["num_files"],
                   "content_sha256": fingerprint, "listing_sha256": plan["listing_sha256"]},
        "resolution": plan["resolution"],
        "codec": codec,
        "latent_shape": [2 * codec["latent_channels"], latent_size, latent_size],
        "latent_stats": {"mean": mean, "std": std},
        "store": plan["store"], "image_format": plan["image_format"],
        "encoder": plan["encoder"], "feat_shape": filled[0]["feat_shape"],
        "num_classes": len(class_names), "class_names": class_names,
        "class_counts": [labels.get(i, 0) for i in range(len(class_names))],
        "num_samples": sum(m["count"] for m in filled),
        "shards": [{"name": m["shard"], "count": m["count"], "sha256": m["sha256"], "bytes": m["bytes"]} for m in filled],
        "failures": {"count": len(failures), "files": failures},
    }
