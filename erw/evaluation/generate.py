"""`erw sample`: generate images from a checkpoint, on one process or many (torchrun).

The work is cut into global batches of `batch_size` consecutive sample indices; batch b goes to
rank b mod world_size. Sample i has label classes[i mod len(classes)] (balanced) and draws all
its noise from its own generator seeded by (seed, i). A batch's content therefore depends on
neither the number of ranks nor which rank ran it: 1 or 64 GPUs write the same images.
Finished batches are skipped on a rerun, so a preempted job resumes where it stopped
(sample_store.py has the output layout).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from erw.config import Config, SampleConfig, sample_problems
from erw import storage
from erw.errors import ErwError
from erw.evaluation import sample_store
from erw.data.image_sets import open_image_set
from erw.sampling import Guidance, VelocityFn, model_velocity, sample

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class SamplingJobError(ErwError):
    pass


@dataclass(frozen=True)
class SampleJob:
    """Which samples to draw and how; a pure description, identical on every rank."""

    settings: SampleConfig
    classes: tuple[int, ...]
    seed: int
    path: str  # the interpolant the model was trained with
    latent_shape: tuple[int, int, int]
    null_class: int

    @property
    def num_batches(self) -> int:
        return math.ceil(self.settings.num_samples / self.settings.batch_size)

    def indices(self, batch: int) -> range:
        start = batch * self.settings.batch_size
        return range(start, min(start + self.settings.batch_size, self.settings.num_samples))

    def labels(self, indices: range) -> Tensor:
        return torch.tensor([self.classes[i % len(self.classes)] for i in indices], dtype=torch.long)

    def batches_for(self, rank: int, world_size: int) -> range:
        return range(rank, self.num_batches, world_size)

    @property
    def guidance(self) -> Guidance:
        s = self.settings
        return Guidance(scale=s.cfg_scale, low=s.guidance_low, high=s.guidance_high, null_class=self.null_class)

    def describe(self) -> dict[str, Any]:
        """What settings.json records; two runs into one --out must agree on all of it."""
        s = self.settings
        return {
            "num_samples": s.num_samples,
            "batch_size": s.batch_size,
            "mode": s.mode,
            "solver": s.solver,
            "heun_convention": s.heun_convention,
            "steps": s.steps,
            "cfg_scale": s.cfg_scale,
            "guidance_low": s.guidance_low,
            "guidance_high": s.guidance_high,
            "use_ema": s.use_ema,
            "seed": self.seed,
            "path": self.path,
            "classes": list(self.classes),
        }


def sample_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for sample `index` (neighbouring indices get unrelated streams)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


class PerSampleNoise:
    """NoiseFn whose row i comes from sample i's own generator. Drawn on the CPU in float64, so
    the same seed gives the same noise on any device and batch layout."""

    def __init__(self, seed: int, indices: range, shape: tuple[int, ...], device: torch.device | str):
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]
        self.shape, self.device = shape, device

    def __call__(self) -> Tensor:
        draws = [torch.randn(self.shape, generator=g, dtype=torch.float64) for g in self.generators]
        return torch.stack(draws).to(self.device)


def generate_batch(
    job: SampleJob, velocity: VelocityFn, batch: int, device: torch.device | str
) -> tuple[range, Tensor, Tensor]:
    """(indices, labels, model-space latents float64) of one global batch."""
    indices = job.indices(batch)
    labels = job.labels(indices).to(device)
    noise = PerSampleNoise(job.seed, indices, job.latent_shape, device)
    s = job.settings
    latents = sample(
        velocity,
        noise,
        labels,
        mode=s.mode,
        steps=s.steps,
        solver=s.solver,
        path=job.path,
        guidance=job.guidance,
        heun_convention=s.heun_convention,
    )
    return indices, labels.cpu(), latents


def generate_slice(
    job: SampleJob,
    velocity: VelocityFn,
    decode: Callable[[Tensor], Tensor],
    rank: int,
    world_size: int,
    device: torch.device | str,
    skip: Callable[[int], bool] = lambda batch: False,
) -> Iterator[tuple[int, range, Tensor, Tensor]]:
    """This rank's batches as (batch, indices, labels, uint8 images [B, 3, H, W]); `skip` says
    which are already done."""
    for batch in job.batches_for(rank, world_size):
        if skip(batch):
            continue
        indices, labels, latents = generate_batch(job, velocity, batch, device)
        yield batch, indices, labels, decode(latents).cpu()


def with_overrides(settings: SampleConfig, **overrides: Any) -> SampleConfig:
    """The checkpoint's sample settings with the command line's non-None values on top."""
    return dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def plan_job(cfg: Config, settings: SampleConfig, classes: list[int] | None, seed: int) -> SampleJob:
    """Check a request against the checkpoint's config (every problem in one message) and plan it."""
    num_classes = cfg.model.num_classes
    problems = sample_problems(settings)
    chosen = tuple(classes) if classes else tuple(range(num_classes))
    outside = [c for c in chosen if not 0 <= c < num_classes]
    if outside:
        problems.append(
            f"--classes {', '.join(map(str, outside))} outside the model's classes 0..{num_classes - 1} "
            f"(it was trained on {num_classes}; {num_classes} itself is the unconditional label)"
        )
    if settings.cfg_scale != 1.0 and cfg.model.class_dropout == 0.0:
        problems.append(
            "--cfg-scale needs an unconditional model, but this one was trained with model.class_dropout=0: use --cfg-scale 1"
        )
    if seed < 0:
        problems.append(f"--seed must be >= 0, got {seed}")
    if problems:
        raise SamplingJobError("cannot sample:\n  - " + "\n  - ".join(problems))
    latent_shape = (cfg.data.latent_channels, cfg.data.latent_size, cfg.data.latent_size)
    return SampleJob(settings, chosen, seed, cfg.objective.path, latent_shape, null_class=num_classes)


def load_model(checkpoint: Any, use_ema: bool, device: torch.device | str) -> torch.nn.Module:
    """The SiT of a phase-2 checkpoint, without its projector (sampling never reads it)."""
    from erw.models.sit import sit_from_config

    if checkpoint.phase != "train":
        raise SamplingJobError(
            f"{checkpoint.uri} is a {checkpoint.phase!r} checkpoint, which has no output layer: "
            "sample from a checkpoint of `erw train`"
        )
    cfg = checkpoint.config()
    model = sit_from_config(cfg.model, cfg.data.latent_size, cfg.data.latent_channels, encoder_dim=None)
    state = checkpoint.ema_state if use_ema else checkpoint.model_state
    try:
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("projectors.")})
    except RuntimeError as err:
        raise SamplingJobError(
            f"the weights in {checkpoint.uri} do not fit the model its config describes: {err}"
        ) from None
    return model.to(device).eval()


@dataclass
class SampleRequest:
    ckpt: str
    out: str
    overrides: dict[str, Any]  # SampleConfig fields from the command line (None = the checkpoint's)
    classes: list[int] | None = None  # None = every class
    seed: int | None = None  # None = the run's seed
    npz: bool = False
    precision: str = "fp32"
    pushgateway: str | None = None  # None = the run's metrics.pushgateway


def run_sampling(request: SampleRequest, log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Generate this rank's share; rank 0 then writes the manifest (and .npz) and returns it."""
    from erw.data.loader import read_manifest
    from erw.telemetry import push_metrics
    from erw.data.codec import load_codec
    from erw.training.checkpoint import load_checkpoint
    from erw.training.distributed import barrier, init_distributed, shutdown

    if request.precision not in AUTOCAST:
        raise SamplingJobError(f"--precision {request.precision!r} must be one of {', '.join(AUTOCAST)}")
    checkpoint = load_checkpoint(request.ckpt, with_train_state=False)
    cfg = checkpoint.config()
    settings = with_overrides(cfg.sample, **request.overrides)
    job = plan_job(cfg, settings, request.classes, cfg.seed if request.seed is None else request.seed)
    d = init_distributed()
    try:
        sample_store.claim_output(request.out, job.describe() | {"checkpoint": checkpoint.uri}, d.is_main)
        model = load_model(checkpoint, settings.use_ema, d.device)
        data_manifest = read_manifest(cfg.data.shards) if cfg.data.shards else None
        codec = load_codec(cfg.data, d.device, data_manifest)
        velocity = model_velocity(model, AUTOCAST[request.precision])
        started = time.perf_counter()
        made = 0
        done = lambda batch: sample_store.batch_done(request.out, batch)
        for batch, indices, labels, images in generate_slice(
            job, velocity, codec.decode, d.rank, d.world_size, d.device, done
        ):
            sample_store.write_shard(request.out, batch, indices, labels, images)
            made += len(indices)
            if d.is_main:
                log(
                    f"batch {batch + 1}/{job.num_batches}: {made / (time.perf_counter() - started):.2f} images/s on rank 0"
                )
        made = _sum_over_ranks(made, d)
        barrier(d)
        if not d.is_main:
            return None
        seconds = time.perf_counter() - started
        class_names = data_manifest.get("class_names") if data_manifest else None
        manifest = sample_store.write_manifest(
            request.out,
            job.num_batches,
            settings.num_samples,
            {
                "settings": job.describe(),
                "checkpoint": checkpoint.uri,
                "step": checkpoint.step,
                "run_id": cfg.run_id,
                "resolution": cfg.data.resolution,
                "num_classes": cfg.model.num_classes,
                "class_names": class_names,
            },
        )
        if request.npz:
            batches = open_image_set(request.out).batches(256)
            sample_store.write_npz(
                storage.join(request.out, sample_store.NPZ), batches, settings.num_samples, cfg.data.resolution
            )
        gateway = cfg.metrics.pushgateway if request.pushgateway is None else request.pushgateway
        push_metrics(
            gateway,
            "erw-sample",
            cfg.run_id,
            {
                "erw_sample_images_total": made,
                "erw_sample_images_per_second": made / max(seconds, 1e-9),
                "erw_sample_seconds": seconds,
            },
        )
        log(
            f"wrote {settings.num_samples} samples to {request.out} ({made} generated now, {made / max(seconds, 1e-9):.2f} images/s)"
        )
        return manifest
    finally:
        shutdown(d)


def _sum_over_ranks(value: int, d: Any) -> int:
    if not d.enabled:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=d.device)
    torch.distributed.all_reduce(total)
    return int(total.item())
