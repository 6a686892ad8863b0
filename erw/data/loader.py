"""The shard loader: latent shards (local or s3://) -> an endless stream of training batches.

The order of the samples is a function of (dataset, seed, global batch G, shuffle buffer) alone,
not of the number of ranks or workers, so a run can resume on another number of ranks:

- every epoch, the shards of the manifest are permuted with (seed, epoch) and their samples
  laid end to end; the sequence is cut into G contiguous, equal (+-1) *partitions*;
- a partition emits its range through a shuffle buffer of data.shuffle_buffer samples whose
  order is drawn from (seed, epoch, partition) over sample positions alone, before any data is
  read; it flows on into its range of the next epoch, forever;
- optimizer step k (a *round*) takes sample k of every partition: G samples, partition p at
  position p of the global batch. Rank r of W takes partitions [r G/W, (r+1) G/W), split in
  order into grad_accum micro-batches;
- the latent is drawn from the stored moments with noise seeded by (seed, epoch, sample).

So the state is one number, the rounds handed out. The guarantee, like MosaicML Streaming's
"elastic determinism": a run checkpointed after round k on W ranks and resumed on W' ranks
(any W' that divides G; any data.num_workers, any grad_accum) trains from round k on on
exactly the samples, latents and per-step sample sets of the uninterrupted run: no sample of
an epoch is seen twice or skipped. What changes the order (another G, seed, shuffle buffer or
dataset) is refused on resume, naming the setting. On resume each partition skips what it had
emitted without opening finished shards, and rebuilds its buffer by reading only what it still
has to emit. A rank reads its G/W partitions with data.num_workers DataLoader workers (at most
one per partition), each holding up to data.shuffle_buffer samples per partition.

Data problems are found before compute where the manifest allows it (class count, latent
shape, every shard's size), while streaming otherwise: every shard read to its end is hashed
and compared with the manifest's sha256; a sample with a label out of range, a latent of the
wrong shape or an unreadable member is dropped from its micro-batch and named on stderr, up to
data.max_bad_samples per worker, after which training stops with a DatasetError.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from erw import storage
from erw.data.codec import LatentNorm
from erw.data.shards import (
    IMAGE_MEMBERS,
    MANIFEST,
    DatasetError,
    decode_crop,
    load_npy,
    read_tar_samples,
    resolve_uri,
)
from erw.errors import ErwError

SUPPORTED_FORMAT_VERSIONS = (1,)
STATE_VERSION = 2
__all__ = ["DatasetError", "ShardLoader", "build_loader", "read_manifest", "check_manifest"]


# ---------------------------------------------------------------------------------------------
# The manifest and the checks made before any compute.


def read_manifest(shards: str) -> dict[str, Any]:
    if not shards:
        raise DatasetError("data.shards is empty: set data.shards=URI, where `erw precompute` wrote the latents")
    storage.check_uri(shards, "data.shards")
    try:
        manifest = json.loads(storage.read_bytes(storage.join(shards, MANIFEST)))
    except storage.ObjectNotFound:
        raise DatasetError(
            f"{shards} has no {MANIFEST}: the dataset is incomplete (precompute still running, failed, "
            f"or never merged). Finish it with `erw precompute --merge data.shards={shards}`"
        ) from None
    except json.JSONDecodeError as err:
        raise DatasetError(f"{storage.join(shards, MANIFEST)} is not valid JSON: {err}") from None
    if manifest.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
        raise DatasetError(
            f"{shards}: manifest format version {manifest.get('format_version')!r} is not supported "
            f"(this erw reads {SUPPORTED_FORMAT_VERSIONS}); precompute the shards again"
        )
    return manifest


def check_manifest(manifest: dict[str, Any], data_cfg: Any, num_classes: int | None = None) -> None:
    """Refuse shards that do not match the config the model is built from."""
    codec = manifest["codec"]
    problems = []
    if manifest["resolution"] != data_cfg.resolution:
        problems.append(f"data.resolution={data_cfg.resolution} but the shards are {manifest['resolution']}px")
    if codec["name"] != data_cfg.codec:
        problems.append(f"data.codec={data_cfg.codec!r} but the shards were encoded with {codec['name']!r}")
    else:
        shape = [codec["latent_channels"], *manifest["latent_shape"][1:]]
        expected = [data_cfg.latent_channels, data_cfg.latent_size, data_cfg.latent_size]
        if shape != expected:
            problems.append(f"the model expects latents {expected} but the shards hold {shape}")
    if num_classes is not None and manifest["num_classes"] > num_classes:
        problems.append(
            f"model.num_classes={num_classes} but the shards hold {manifest['num_classes']} classes: labels "
            f"{num_classes} and up would train as the classifier-free-guidance null class or fail. "
            f"Set model.num_classes={manifest['num_classes']}"
        )
    if problems:
        raise DatasetError(
            f"the shards at {data_cfg.shards} do not match the config:\n  - "
            + "\n  - ".join(problems)
            + "\nSet the config to match them, or precompute shards for this config"
        )


def check_shard_sizes(shards: str, manifest: dict[str, Any]) -> None:
    """One listing per folder of shards: every shard the manifest names is there with its size
    (a truncated, missing or replaced shard is refused before compute; content is checked while
    streaming)."""
    folders: dict[str, dict[str, int]] = {}
    problems = []
    for shard in manifest["shards"]:
        uri = resolve_uri(shards, shard["name"])
        folder, _, name = uri.rpartition("/")
        if folder not in folders:
            folders[folder] = {f.path: f.size for f in storage.list_files(folder) if "/" not in f.path}
        size = folders[folder].get(name)
        if size is None:
            problems.append(f"{shard['name']} is missing")
        elif size != shard["bytes"]:
            problems.append(f"{shard['name']} has {size} bytes, the manifest says {shard['bytes']}")
    if problems:
        shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise DatasetError(
            f"the shards at {shards} do not match their {MANIFEST}:\n  - "
            + "\n  - ".join(shown)
            + "\nThe dataset was changed or partly rewritten: precompute it again (or restore the shards)"
        )


# ---------------------------------------------------------------------------------------------
# The epoch plan: pure functions of counts and seeds, no data read.


@dataclass(frozen=True)
class Plan:
    shard_uris: tuple[str, ...]
    counts: tuple[int, ...]
    seed: int
    num_partitions: int  # the global batch
    shuffle_buffer: int
    sha256: tuple[str | None, ...] = ()  # per shard, from the manifest: checked when read whole
    sizes: tuple[int, ...] = ()

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def partition_range(self, partition: int) -> tuple[int, int]:
        """[start, stop) of this partition in the epoch's concatenated sample sequence."""
        n, s = self.num_samples, self.num_partitions
        return partition * n // s, (partition + 1) * n // s

    def pieces(self, epoch: int, partition: int) -> list[tuple[int, int, int]]:
        """(shard, first, stop) sample ranges this partition reads in this epoch, in reading order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.counts))
        start, stop = self.partition_range(partition)
        pieces, position = [], 0
        for shard in order.tolist():
            count = self.counts[shard]
            lo, hi = max(start, position), min(stop, position + count)
            if lo < hi:
                pieces.append((shard, lo - position, hi - position))
            position += count
        return pieces

    def order(self, epoch: int, partition: int) -> np.ndarray:
        start, stop = self.partition_range(partition)
        return buffered_order(
            stop - start, self.shuffle_buffer, np.random.default_rng([self.seed, epoch, partition, 1])
        )


def buffered_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a shuffle buffer of `buffer` items emits items 0..n-1.

    Items enter in order; once the buffer is full, each new arrival evicts a random item.
    It is computed on positions only, so data can be read later in arrival order and never
    more than `buffer` items are held.
    """
    draws = rng.random(n)
    out = np.empty(n, dtype=np.int64)
    held: list[int] = []
    emitted = 0
    for item in range(n):
        held.append(item)
        if len(held) >= buffer:
            pick = int(draws[item] * len(held))
            held[pick], held[-1] = held[-1], held[pick]
            out[emitted] = held.pop()
            emitted += 1
    out[emitted:] = np.asarray(held, dtype=np.int64)[rng.permutation(len(held))]
    return out


def partition_samples(plan: Plan, partition: int, start: int) -> Iterator[tuple[int, int, dict]]:
    """(epoch, sample id, raw sample) of one partition, forever, from its `start`-th sample on."""
    begin, stop = plan.partition_range(partition)
    epoch, offset = divmod(start, stop - begin)
    while True:
        yield from _epoch_samples(plan, epoch, partition, offset)
        epoch, offset = epoch + 1, 0


def _epoch_samples(plan: Plan, epoch: int, partition: int, offset: int) -> Iterator[tuple[int, int, dict]]:
    order = plan.order(epoch, partition)
    if offset >= len(order):
        return
    emitted = set(order[:offset].tolist())  # already handed out before a resume
    first = int(order[offset:].min())  # arrivals before it were all emitted: do not read them
    held: dict[int, tuple[int, dict]] = {}
    with contextlib.closing(_arrivals(plan, plan.pieces(epoch, partition), first)) as arrivals:
        for want in order[offset:].tolist():
            while want not in held:
                position, sample_id, sample = next(arrivals)
                if position not in emitted:
                    held[position] = (sample_id, sample)
            sample_id, sample = held.pop(want)
            yield epoch, sample_id, sample
        for _ in arrivals:  # nothing is left; this lets the last shard finish its checksum
            pass


def _arrivals(plan: Plan, pieces: list[tuple[int, int, int]], first: int) -> Iterator[tuple[int, int, dict]]:
    """(position in the partition's range, sample id, raw sample) in reading order, from `first` on.

    A tar streams from its first byte, so the partition whose piece ends at the end of a shard
    reads all of it: that one checks the shard against the manifest's sha256.
    """
    shard_starts = np.concatenate([[0], np.cumsum(plan.counts)[:-1]])
    position = 0
    for shard, lo, hi in pieces:
        if position + hi - lo <= first:  # the whole piece was emitted before the resume
            position += hi - lo
            continue
        begin = lo + max(0, first - position)
        whole = hi == plan.counts[shard] and bool(plan.sha256) and plan.sha256[shard] is not None
        expect = (plan.sha256[shard], plan.sizes[shard]) if whole else (None, None)
        index = -1
        with contextlib.closing(read_tar_samples(plan.shard_uris[shard], *expect)) as samples:
            for index, sample in enumerate(samples):
                if index >= hi:
                    break  # a shard with more samples than the manifest says; reported below
                if index >= begin:
                    yield position + index - lo, int(shard_starts[shard]) + index, sample
                if index + 1 >= hi and not whole:
                    break
        if index + 1 != hi:
            raise DatasetError(
                f"{plan.shard_uris[shard]} holds {'more than ' if index >= hi else ''}{min(index + 1, hi)} samples "
                f"but the manifest says {plan.counts[shard]}: the shard was changed or truncated; "
                "precompute the dataset again"
            )
        position += hi - lo


# ---------------------------------------------------------------------------------------------
# Decoding and checking samples, inside the DataLoader workers.


class BadSample(ValueError):
    """One sample cannot be used; it is dropped and counted."""


@dataclass(frozen=True)
class Decoding:
    seed: int
    norm: LatentNorm
    image_format: str | None  # of the stored crop; None: do not decode it
    with_features: bool
    latent_shape: tuple[int, ...] | None = None  # of the stored moments, from the manifest
    num_classes: int | None = None
    image_size: int | None = None
    feat_shape: tuple[int, ...] | None = None


def decode_sample(epoch: int, sample_id: int, sample: dict, how: Decoding) -> dict[str, Any]:
    """The training sample; raises BadSample for a member that is missing, unreadable, of the
    wrong shape, not finite, or a label out of range."""
    try:
        moments = load_npy(sample["latent.npy"]).astype(np.float32)
        label = int(sample["cls"])
        image = (
            decode_crop(sample[IMAGE_MEMBERS[how.image_format]], how.image_format)
            if how.image_format is not None
            else None
        )
        feat = load_npy(sample["feat.npy"]).astype(np.float32) if how.with_features else None
    except KeyError as err:
        raise BadSample(f"no {err.args[0]!r} member") from None
    except (ValueError, OSError, EOFError) as err:
        raise BadSample(f"unreadable member ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if how.latent_shape is not None and tuple(moments.shape) != how.latent_shape:
        raise BadSample(f"latent moments of shape {list(moments.shape)}, the manifest says {list(how.latent_shape)}")
    if not np.isfinite(moments).all():
        raise BadSample("latent holds NaN or Inf")
    if how.num_classes is not None and not 0 <= label < how.num_classes:
        raise BadSample(f"label {label} outside [0, {how.num_classes})")
    if image is not None and how.image_size is not None and image.shape != (how.image_size, how.image_size, 3):
        raise BadSample(f"image of shape {list(image.shape)}, expected [{how.image_size}, {how.image_size}, 3]")
    if feat is not None and how.feat_shape is not None and tuple(feat.shape) != how.feat_shape:
        raise BadSample(f"features of shape {list(feat.shape)}, the manifest says {list(how.feat_shape)}")
    mean, std = np.split(moments, 2, axis=0)
    if std.any():  # identity codec: std is 0 and the latent is the mean
        noise = np.random.default_rng([how.seed, epoch, sample_id]).standard_normal(mean.shape, dtype=np.float32)
        mean = mean + std * noise
    out = {"latent": mean, "label": label, "index": sample_id, "epoch": epoch}
    if image is not None:
        out["image"] = image.transpose(2, 0, 1)
    if feat is not None:
        out["feat"] = feat
    return out


def collate(items: list[dict[str, Any]], norm: LatentNorm) -> dict[str, torch.Tensor]:
    batch = {
        "latent": norm.normalize(torch.from_numpy(np.stack([i["latent"] for i in items]))),
        "label": torch.tensor([i["label"] for i in items], dtype=torch.int64),
        "index": torch.tensor([i["index"] for i in items], dtype=torch.int64),
        "epoch": torch.tensor([i["epoch"] for i in items], dtype=torch.int64),
    }
    for key in ("image", "feat"):
        if key in items[0]:
            batch[key] = torch.from_numpy(np.stack([i[key] for i in items]))
    return batch


@dataclass(frozen=True)
class WorkerFailure:
    """An ErwError of a worker, handed to the main process as a value: raised in the worker it
    would reach the user wrapped in the worker's whole traceback instead of its one line."""

    error: ErwError


class RankPartitions(torch.utils.data.IterableDataset):
    """One rank's partitions. Worker v of n reads partitions v, v+n, ... of the rank and yields,
    per round, one chunk: {"round", "partition" [k], and the collated samples of its partitions}."""

    def __init__(self, plan: Plan, how: Decoding, partitions: range, start_round: int, max_bad_samples: int):
        super().__init__()
        self.plan, self.how, self.partitions = plan, how, partitions
        self.start_round, self.max_bad_samples = start_round, max_bad_samples

    def __iter__(self) -> Iterator[dict[str, Any] | WorkerFailure]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = list(self.partitions[worker::workers])
        streams = [partition_samples(self.plan, p, self.start_round) for p in mine]
        bad = 0
        try:
            for round_ in range(self.start_round, sys.maxsize):
                items, kept = [], []
                for partition, stream in zip(mine, streams):
                    epoch, sample_id, raw = next(stream)
                    try:
                        items.append(decode_sample(epoch, sample_id, raw, self.how))
                        kept.append(partition)
                    except BadSample as err:
                        bad += 1
                        where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
                        if bad > self.max_bad_samples:
                            raise DatasetError(
                                f"{where}: {err}; that is {bad} bad samples in one loader worker, more than "
                                f"data.max_bad_samples={self.max_bad_samples} (each was named on stderr). Fix or "
                                "precompute the dataset again, or raise data.max_bad_samples"
                            ) from None
                        print(
                            f"data: dropped {where}: {err} ({bad} of data.max_bad_samples="
                            f"{self.max_bad_samples} in this worker)",
                            file=sys.stderr,
                            flush=True,
                        )
                chunk: dict[str, Any] = collate(items, self.how.norm) if items else {}
                chunk.update(round=round_, partition=torch.tensor(kept, dtype=torch.int64))
                yield chunk
        except ErwError as err:
            yield WorkerFailure(err)


# ---------------------------------------------------------------------------------------------
# The loader the trainer holds.


def _ignore_termination(_worker_id: int) -> None:
    # Kubernetes and torchrun send SIGTERM to the whole process group; the trainer checkpoints at
    # the next step, which needs its workers alive until then (they die with the main process).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# What each field of the loader state is called in the config, for the refusal message.
_STATE_SETTINGS = {
    "global_batch": "the global batch (batch_size of the phase)",
    "seed": "seed",
    "shuffle_buffer": "data.shuffle_buffer",
    "dataset": "the dataset (data.shards: its content fingerprint)",
    "num_samples": "the dataset (data.shards: its number of samples)",
}


class ShardLoader:
    """Iterates forever; state_dict()/load_state_dict() resume exactly, on any world size that
    divides the global batch. Every rank hands out the same number of batches, so the state of
    rank 0 resumes all ranks."""

    def __init__(
        self,
        shards: str,
        manifest: dict[str, Any],
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        num_workers: int,
        shuffle_buffer: int,
        with_images: bool,
        global_batch: int | None = None,
        num_classes: int | None = None,
        max_bad_samples: int = 0,
    ):
        self.manifest = manifest
        self.global_batch = global_batch or batch_size * world_size
        if self.global_batch % world_size or (self.global_batch // world_size) % batch_size:
            raise DatasetError(
                f"the global batch {self.global_batch} does not split into {world_size} ranks x micro-batches of "
                f"{batch_size}: make batch_size a multiple of world size x grad_accum"
            )
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        per_rank = self.global_batch // world_size
        self.partitions = range(rank * per_rank, (rank + 1) * per_rank)
        self.micro_per_round = per_rank // batch_size
        self.workers = min(num_workers, per_rank)  # at most one worker per partition; 0: in this process
        self.max_bad_samples = max_bad_samples
        self.plan = Plan(
            tuple(resolve_uri(shards, s["name"]) for s in manifest["shards"]),
            tuple(s["count"] for s in manifest["shards"]),
            seed,
            self.global_batch,
            max(1, shuffle_buffer),
            sha256=tuple(s.get("sha256") for s in manifest["shards"]),
            sizes=tuple(s.get("bytes", 0) for s in manifest["shards"]),
        )
        if self.plan.num_samples < self.global_batch:
            raise DatasetError(
                f"{shards} holds {self.plan.num_samples} samples, fewer than the global batch {self.global_batch}"
            )
        cached_features = manifest["store"] == "features"
        feat_shape = manifest.get("feat_shape")
        self.how = Decoding(
            seed=seed,
            norm=LatentNorm.from_manifest(manifest),
            image_format=manifest["image_format"] if with_images and not cached_features else None,
            with_features=with_images and cached_features,
            latent_shape=tuple(manifest["latent_shape"]),
            num_classes=manifest["num_classes"],  # the model's may be larger (checked before)
            image_size=manifest["resolution"],
            feat_shape=tuple(feat_shape) if feat_shape else None,
        )
        self.batches = 0  # micro-batches handed out

    @property
    def rounds(self) -> int:
        return self.batches // self.micro_per_round

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.batches % self.micro_per_round:
            raise DatasetError("the loader can only restart at a step boundary")
        dataset = RankPartitions(self.plan, self.how, self.partitions, self.rounds, self.max_bad_samples)
        if self.workers == 0:
            chunks: Any = iter(dataset)
        else:
            chunks = iter(
                torch.utils.data.DataLoader(
                    dataset,
                    batch_size=None,
                    num_workers=self.workers,
                    prefetch_factor=4,
                    worker_init_fn=_ignore_termination,
                    generator=torch.Generator(),  # never draw the workers' base seed from the global RNG
                )
            )
        per_round = max(1, self.workers)
        first = self.partitions.start
        try:
            while True:
                got = [next(chunks) for _ in range(per_round)]
                for chunk in got:
                    if isinstance(chunk, WorkerFailure):
                        raise chunk.error
                    if chunk["round"] != self.rounds:
                        raise RuntimeError(
                            f"loader workers out of step: round {chunk['round']}, expected {self.rounds}"
                        )
                filled = [c for c in got if len(c["partition"])]
                partition = torch.cat([c["partition"] for c in got])
                order = torch.argsort(partition)
                partition = partition[order]
                keys = [k for k in (filled[0] if filled else {}) if k not in ("round", "partition")]
                merged = {k: torch.cat([c[k] for c in filled])[order] for k in keys}
                for micro in range(self.micro_per_round):
                    lo = first + micro * self.batch_size
                    keep = (partition >= lo) & (partition < lo + self.batch_size)
                    if not bool(keep.any()):
                        raise DatasetError(
                            f"every sample of a micro-batch (partitions {lo}..{lo + self.batch_size - 1}, round "
                            f"{self.rounds}) was bad (named on stderr): fix or precompute the dataset again"
                        )
                    batch = {k: v[keep] for k, v in merged.items()}
                    batch["position"] = partition[keep]  # the place in the global batch, 0..G-1
                    if torch.cuda.is_available():
                        batch = {k: v.pin_memory() for k, v in batch.items()}
                    self.batches += 1
                    yield batch
        finally:
            # Stop the workers now, also when an error leaves this frame alive in a traceback:
            # they ignore SIGTERM, so an exiting interpreter would otherwise wait for them forever.
            shutdown = getattr(chunks, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "rounds": self.rounds,
            "global_batch": self.global_batch,
            "seed": self.plan.seed,
            "shuffle_buffer": self.plan.shuffle_buffer,
            "dataset": self.manifest["source"]["content_sha256"],
            "num_samples": self.plan.num_samples,
            # informative only: resuming on another world size or worker count is exact
            "world_size": self.world_size,
            "num_workers": self.workers,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise DatasetError(
                f"the checkpoint's data position was saved by an older erw (loader state version "
                f"{state.get('version')!r}, this one reads {STATE_VERSION}), whose sample order depended on the "
                "world size and worker count: it cannot be continued exactly. Start a new run (or use the older erw)"
            )
        mine = self.state_dict()
        differ = {
            _STATE_SETTINGS[k]: f"{state.get(k)!r} then, {mine[k]!r} now"
            for k in _STATE_SETTINGS
            if state.get(k) != mine[k]
        }
        if differ:
            raise DatasetError(
                "cannot resume the data position exactly, a setting that fixes the sample order changed:\n  - "
                + "\n  - ".join(f"{name}: {change}" for name, change in differ.items())
                + "\nSet it back to continue this run (the world size, data.num_workers and grad_accum may change), "
                "or start a new run in a new out"
            )
        self.batches = int(state["rounds"]) * self.micro_per_round


def build_loader(
    data_cfg: Any,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    with_images: bool,
    global_batch: int | None = None,
    num_classes: int | None = None,
) -> ShardLoader:
    """The loader of `data_cfg.shards` for one rank, after checking the manifest against data_cfg
    (and num_classes, the model's) and the shards' sizes against the manifest.

    batch_size is the micro-batch of one rank; global_batch (default batch_size x world_size)
    is the samples per optimizer step over all ranks. Batches: "latent" float32 [B, C, h, w] in
    model space, "label" int64 [B], "index" and "epoch" int64 [B] (the sample's position in the
    manifest's shard order, and the epoch it was drawn in), and with_images: "image" uint8
    [B, 3, R, R], or "feat" float32 [B, T, D] when the shards cache encoder tokens instead of
    images. B is batch_size less the bad samples dropped (none in a sound dataset). "position"
    int64 [B] is each sample's place in the step's global batch (0..G-1, independent of the
    world size): the trainer keys its per-sample draws by it (erw.draws), so the losses
    of an elastic resume match too.
    """
    if batch_size < 1:
        raise DatasetError(f"per-rank batch size must be at least 1, got {batch_size}")
    manifest = read_manifest(data_cfg.shards)
    check_manifest(manifest, data_cfg, num_classes)
    check_shard_sizes(data_cfg.shards, manifest)
    return ShardLoader(
        data_cfg.shards,
        manifest,
        batch_size,
        rank,
        world_size,
        seed,
        data_cfg.num_workers,
        data_cfg.shuffle_buffer,
        with_images,
        global_batch=global_batch,
        num_classes=num_classes,
        max_bad_samples=getattr(data_cfg, "max_bad_samples", 0),
    )
