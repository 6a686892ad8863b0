"""The shard loader: latent shards (local or s3://) -> an endless stream of training batches.

Every epoch is a deterministic function of (seed, epoch), so a position is one number:

- the shards of the manifest are permuted with (seed, epoch) and their samples laid end to
  end; the sequence is cut into world_size x num_workers contiguous, equal (+-1) ranges, one
  per *slot* (a DataLoader worker of a rank). Each sample is read by exactly one slot per
  epoch, and a slot opens only the shards that overlap its range;
- a slot emits its range through a shuffle buffer whose order is drawn from
  (seed, epoch, slot) over sample positions alone, before any data is read;
- each slot batches its own stream; the DataLoader takes batches from its workers round
  robin, so batch j of a rank came from worker j mod W;
- the latent is drawn from the stored moments with noise seeded by (seed, epoch, sample).

So the state is the number of batches handed out. On resume each worker recomputes its
position, skips the shards it had finished without opening them, and rebuilds its shuffle
buffer by reading only what it still has to emit: the resumed loader yields exactly the
batches the uninterrupted one would have. Batches flow across epoch boundaries (the stream
never ends), so every rank always has a next batch.
"""
from __future__ import annotations

import contextlib
import json
import signal
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from erw import storage
from erw.data.shards import IMAGE_MEMBERS, MANIFEST, decode_crop, load_npy, read_tar_samples, resolve_uri
from erw.errors import ErwError
from erw.data.codec import LatentNorm

SUPPORTED_FORMAT_VERSIONS = (1,)
STATE_VERSION = 1


class DatasetError(ErwError):
    """The shards cannot be used as configured; the message says why and how to fix it."""


# ---------------------------------------------------------------------------------------------
# The manifest.


def read_manifest(shards: str) -> dict[str, Any]:
    if not shards:
        raise DatasetError("data.shards is empty: set data.shards=URI, the --out of `erw precompute`")
    try:
        manifest = json.loads(storage.read_bytes(storage.join(shards, MANIFEST)))
    except storage.ObjectNotFound:
        raise DatasetError(
            f"{shards} has no {MANIFEST}: the dataset is incomplete (precompute still running, failed, "
            f"or never merged). Finish it with `erw precompute --merge --out {shards}`"
        ) from None
    except json.JSONDecodeError as err:
        raise DatasetError(f"{storage.join(shards, MANIFEST)} is not valid JSON: {err}") from None
    if manifest.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
        raise DatasetError(
            f"{shards}: manifest format version {manifest.get('format_version')!r} is not supported "
            f"(this erw reads {SUPPORTED_FORMAT_VERSIONS}); precompute the shards again"
        )
    return manifest


def check_manifest(manifest: dict[str, Any], data_cfg: Any) -> None:
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
    if problems:
        raise DatasetError(
            f"the shards at {data_cfg.shards} do not match the config:\n  - " + "\n  - ".join(problems)
            + "\nSet data.* to match them, or precompute shards for this config"
        )


# ---------------------------------------------------------------------------------------------
# The epoch plan: pure functions of counts and seeds, no data read.


@dataclass(frozen=True)
class Plan:
    shard_uris: tuple[str, ...]
    counts: tuple[int, ...]
    seed: int
    num_slots: int  # world_size x workers per rank
    shuffle_buffer: int

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def slot_range(self, slot: int) -> tuple[int, int]:
        """[start, stop) of this slot in the epoch's concatenated sample sequence."""
        n, s = self.num_samples, self.num_slots
        return slot * n // s, (slot + 1) * n // s

    def pieces(self, epoch: int, slot: int) -> list[tuple[int, int, int]]:
        """(shard, first, stop) sample ranges this slot reads in this epoch, in reading order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.counts))
        start, stop = self.slot_range(slot)
        pieces, position = [], 0
        for shard in order.tolist():
            count = self.counts[shard]
            lo, hi = max(start, position), min(stop, position + count)
            if lo < hi:
                pieces.append((shard, lo - position, hi - position))
            position += count
        return pieces

    def order(self, epoch: int, slot: int) -> np.ndarray:
        start, stop = self.slot_range(slot)
        return buffered_order(stop - start, self.shuffle_buffer, np.random.default_rng([self.seed, epoch, slot, 1]))


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


def slot_samples(plan: Plan, slot: int, start: int) -> Iterator[tuple[int, int, dict]]:
    """(epoch, sample id, raw sample) of one slot, forever, from its `start`-th sample on."""
    begin, stop = plan.slot_range(slot)
    epoch, offset = divmod(start, stop - begin)
    while True:
        yield from _epoch_samples(plan, epoch, slot, offset)
        epoch, offset = epoch + 1, 0


def _epoch_samples(plan: Plan, epoch: int, slot: int, offset: int) -> Iterator[tuple[int, int, dict]]:
    order = plan.order(epoch, slot)
    if offset >= len(order):
        return
    emitted = set(order[:offset].tolist())  # already handed out before a resume
    first = int(order[offset:].min())  # arrivals before it were all emitted: do not read them
    held: dict[int, tuple[int, dict]] = {}
    with contextlib.closing(_arrivals(plan, plan.pieces(epoch, slot), first)) as arrivals:
        for want in order[offset:].tolist():
            while want not in held:
                position, sample_id, sample = next(arrivals)
                if position not in emitted:
                    held[position] = (sample_id, sample)
            sample_id, sample = held.pop(want)
            yield epoch, sample_id, sample


def _arrivals(plan: Plan, pieces: list[tuple[int, int, int]], first: int) -> Iterator[tuple[int, int, dict]]:
    """(position in the slot's range, sample id, raw sample) in reading order, from `first` on."""
    shard_starts = np.concatenate([[0], np.cumsum(plan.counts)[:-1]])
    position = 0
    for shard, lo, hi in pieces:
        if position + hi - lo <= first:  # the whole piece was emitted before the resume
            position += hi - lo
            continue
        begin = lo + max(0, first - position)
        index = -1
        with contextlib.closing(read_tar_samples(plan.shard_uris[shard])) as samples:
            for index, sample in enumerate(samples):
                if index >= begin:
                    yield position + index - lo, int(shard_starts[shard]) + index, sample
                if index + 1 >= hi:
                    break
        if index < hi - 1:
            raise DatasetError(
                f"{plan.shard_uris[shard]} holds {index + 1} samples but the manifest says {plan.counts[shard]}: "
                "the shard was changed or truncated; precompute the dataset again"
            )
        position += hi - lo


# ---------------------------------------------------------------------------------------------
# Decoding and batching, inside the DataLoader workers.


@dataclass(frozen=True)
class Decoding:
    seed: int
    norm: LatentNorm
    image_format: str | None  # of the stored crop; None: do not decode it
    with_features: bool


def decode_sample(epoch: int, sample_id: int, sample: dict, how: Decoding) -> dict[str, Any]:
    moments = load_npy(sample["latent.npy"]).astype(np.float32)
    mean, std = np.split(moments, 2, axis=0)
    if std.any():  # identity codec: std is 0 and the latent is the mean
        noise = np.random.default_rng([how.seed, epoch, sample_id]).standard_normal(mean.shape, dtype=np.float32)
        mean = mean + std * noise
    out = {"latent": mean, "label": int(sample["cls"]), "index": sample_id, "epoch": epoch}
    if how.image_format is not None:
        out["image"] = decode_crop(sample[IMAGE_MEMBERS[how.image_format]], how.image_format).transpose(2, 0, 1)
    if how.with_features:
        out["feat"] = load_npy(sample["feat.npy"]).astype(np.float32)
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


class RankBatches(torch.utils.data.IterableDataset):
    """One rank's batches; each DataLoader worker produces those of its slot."""

    def __init__(self, plan: Plan, how: Decoding, rank: int, workers: int, batch_size: int, start_batches: int):
        super().__init__()
        self.plan, self.how, self.rank, self.workers = plan, how, rank, workers
        self.batch_size, self.start_batches = batch_size, start_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        # The DataLoader asks worker 0 first on every (re)start: after n batches the next one
        # is due from the worker that made batch n in the original run, so rotate the roles.
        role = (worker + self.start_batches) % self.workers
        done = (self.start_batches - role + self.workers - 1) // self.workers  # batches this role made
        samples = slot_samples(self.plan, self.rank * self.workers + role, done * self.batch_size)
        try:
            while True:
                items = [decode_sample(*next(samples), self.how) for _ in range(self.batch_size)]
                yield collate(items, self.how.norm)
        except ErwError as err:
            # Handed to the main process as a value: raised in a worker it would reach the user
            # wrapped in the worker's whole traceback instead of its one clear line.
            yield WorkerFailure(err)


@dataclass(frozen=True)
class WorkerFailure:
    error: ErwError


# ---------------------------------------------------------------------------------------------
# The loader the trainer holds.


def _ignore_termination(_worker_id: int) -> None:
    # Kubernetes and torchrun send SIGTERM to the whole process group; the trainer checkpoints at
    # the next step, which needs its workers alive until then (they die with the main process).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ShardLoader:
    """Iterates forever over epochs; state_dict()/load_state_dict() resume exactly.

    Every rank hands out the same number of batches, so the state of rank 0 resumes all ranks.
    """

    def __init__(
        self, shards: str, manifest: dict[str, Any], batch_size: int, rank: int, world_size: int, seed: int,
        num_workers: int, shuffle_buffer: int, with_images: bool,
    ):
        self.manifest = manifest
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers = num_workers
        self.workers = max(1, num_workers)  # slots per rank; 0 workers = one slot in this process
        counts = tuple(s["count"] for s in manifest["shards"])
        self.plan = Plan(
            tuple(resolve_uri(shards, s["name"]) for s in manifest["shards"]), counts, seed,
            world_size * self.workers, max(1, shuffle_buffer),
        )
        if self.plan.num_samples < self.plan.num_slots:
            raise DatasetError(
                f"{shards} holds {self.plan.num_samples} samples, fewer than the {self.plan.num_slots} readers "
                f"({world_size} ranks x {self.workers} workers): lower data.num_workers"
            )
        cached_features = manifest["store"] == "features"
        self.how = Decoding(
            seed=seed, norm=LatentNorm.from_manifest(manifest),
            image_format=manifest["image_format"] if with_images and not cached_features else None,
            with_features=with_images and cached_features,
        )
        self.batches = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        dataset = RankBatches(self.plan, self.how, self.rank, self.workers, self.batch_size, self.batches)
        if self.num_workers == 0:
            batches: Any = iter(dataset)
        else:
            batches = iter(torch.utils.data.DataLoader(
                dataset, batch_size=None, num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                prefetch_factor=4, worker_init_fn=_ignore_termination,
            ))
        for batch in batches:
            if isinstance(batch, WorkerFailure):
                raise batch.error
            self.batches += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION, "batches": self.batches, "batch_size": self.batch_size,
            "world_size": self.world_size, "workers": self.workers, "seed": self.plan.seed,
            "shuffle_buffer": self.plan.shuffle_buffer, "dataset": self.manifest["source"]["content_sha256"],
            "num_samples": self.plan.num_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        differ = [f"{k}: {state.get(k)!r} then, {mine[k]!r} now" for k in mine if k != "batches" and state.get(k) != mine[k]]
        if differ:
            raise DatasetError(
                "cannot resume the data position exactly, the loader is set up differently:\n  - "
                + "\n  - ".join(differ)
                + "\nResume with the same dataset, world size, batch size, data.num_workers and seed"
            )
        self.batches = int(state["batches"])


def build_loader(
    data_cfg: Any, batch_size: int, rank: int, world_size: int, seed: int, with_images: bool
) -> ShardLoader:
    """The loader of `data_cfg.shards` for one rank, after checking the manifest against data_cfg.

    Batches: "latent" float32 [B, C, h, w] in model space, "label" int64 [B], "index" and
    "epoch" int64 [B] (the sample's position in the manifest's shard order, and the epoch it
    was drawn in), and with_images: "image" uint8 [B, 3, R, R], or "feat" float32 [B, T, D]
    when the shards cache encoder tokens instead of images.
    """
    if batch_size < 1:
        raise DatasetError(f"per-rank batch size must be at least 1, got {batch_size}")
    manifest = read_manifest(data_cfg.shards)
    check_manifest(manifest, data_cfg)
    return ShardLoader(
        data_cfg.shards, manifest, batch_size, rank, world_size, seed, data_cfg.num_workers,
        data_cfg.shuffle_buffer, with_images,
    )
