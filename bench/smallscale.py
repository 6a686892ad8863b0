"""Machinery shared by the small-scale studies (convergence.py, sweeps.py): the digits by default,
or any small labelled image set given with --images.

- the images in memory (the digits: 1,797 images at 16x16, 10 classes) as an endless, resumable batch source
  with the identity codec: latents are pixels in [-1, 1], and the encoder's tokens are computed
  once for every image, as `erw precompute data.codec=identity precompute.store=features` would store them;
- the small encoder (alignment target) and the separate evaluator, trained once and reused
  from the cache directory while their settings are unchanged;
- one run of a method through the project's own trainer (erw.training.trainer.run): trained in
  segments of `eval_every` steps, each resumed from the previous segment's checkpoint (the
  trainer's exact resume), and the EMA weights of each segment's checkpoint are sampled and
  scored by the evaluator;
- the cost of a run in steps and in FLOPs (warmup steps priced as warmup steps);
- a per-block linear probe of a trained model's hidden states.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from bench.results_md import RESULTS
from erw.config import Config, config_from_dict
from erw.config import problems as config_problems
from erw.evaluation.features import load_feature_network
from erw.evaluation.generate import PerSampleNoise
from erw.evaluation.metrics import Gaussian, frechet_distance
from erw.evaluation import small_evaluator
from erw.models import small_nets
from erw.models.encoders import CUSTOM, load_encoder
from erw.models.sit import flops_per_image
from erw.data.codec import to_uint8, to_unit_range
from erw.objectives import interpolate
from erw.sampling import model_velocity, sample
from erw.training import checkpoint as ckpt
from erw.training.distributed import Dist
from erw.training.trainer import build_model, run

CPU = Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
# The digits are 8x8 scans: 16x16 keeps all they hold. At 32x32 with 4x4-pixel patches (the same
# 64 tokens) each token of the width-64 model must carry 48 noisy pixel values, and plain SiT sat
# at FD 35.6 after 2,000 steps, against 12.5 at 16x16 with 2x2 patches (same FLOPs, measured).
DIGITS_RESOLUTION, DIGITS_PATCH = 16, 2
SAMPLE_SEED = 1234  # every method and evaluation point samples from the same noise: paired comparisons
PROBE_SPLIT_SEED = 2  # train/test split of the linear probes (the small nets use seeds 0 and 1)


# ---------------------------------------------------------------------------------------------
# Sizes and methods.


@dataclass(frozen=True)
class Size:
    """Everything a study's runs share: the data, the model and the budget (the budget and the
    model scale with the --tiny / default / --full switch; the data comes from --images,
    --resolution and --patch)."""

    budget: int  # optimizer steps per run, ERW warmup included
    eval_every: int
    warmup: int  # ERW warmup steps, part of the budget
    batch: int
    seeds: tuple[int, ...]
    num_samples: int  # generated images per evaluation point
    sample_steps: int  # Heun ODE steps (2 velocity evaluations each)
    # Pixel space: the width must well exceed a patch's 3 * patch**2 values, or the tokens cannot
    # carry the noise the velocity target contains (see DIGITS_RESOLUTION).
    patch: int = DIGITS_PATCH
    depth: int = 6
    hidden: int = 64
    heads: int = 4
    projector_dim: int = 256
    align_depth: int = 3
    l2r_depth: int = 2
    lr: float = 1e-3
    ema_decay: float = 0.99
    encoder_steps: int = 600
    evaluator_steps: int = 600
    encoder_depth: int = 4
    num_digits: int = 0  # the first n images only (0 = all): --tiny
    images: str = ""  # the dataset (--images); "" = the bundled digits
    resolution: int = DIGITS_RESOLUTION
    num_classes: int = 10  # set from the data's labels

    @classmethod
    def from_json(cls, fields: dict) -> "Size":
        """The Size a study's json recorded (json turns the seeds tuple into a list)."""
        return cls(**{**fields, "seeds": tuple(fields["seeds"])})

    def problems(self) -> list[str]:
        out = []
        if self.budget % self.eval_every or self.warmup % self.eval_every:
            out.append(
                f"budget {self.budget} and warmup {self.warmup} must be multiples of eval_every {self.eval_every}"
            )
        if not 0 < self.warmup < self.budget:
            out.append(f"warmup {self.warmup} must be inside the budget {self.budget}")
        if self.resolution % self.patch:
            out.append(f"--resolution {self.resolution} is not a multiple of --patch {self.patch}")
        if not self.seeds:
            out.append("--seeds must be at least 1")
        if not out:  # the model's own rules (depths, L2R prefix, projector), before any compute
            found = config_problems(study_config(self, main_methods(self)[2], 0, Path("."), ""))
            out += [f"the study's model (--depth, --l2r-depth, --align-depth): {problem}" for problem in found]
        return out


@dataclass(frozen=True)
class Method:
    """A way to spend the budget. overrides are config keys applied on top of the study's."""

    name: str
    align: bool  # aligns to the encoder (REPA) in phase 2
    warmup: int = 0  # ERW warmup steps (0 = none), counted in the budget
    overrides: tuple[str, ...] = ()


SIZES = {
    "tiny": Size(
        budget=4,
        eval_every=2,
        warmup=2,
        batch=8,
        seeds=(0, 1, 2),
        num_samples=20,
        sample_steps=2,
        depth=3,
        hidden=32,
        heads=2,
        projector_dim=32,
        align_depth=2,
        l2r_depth=1,
        encoder_steps=5,
        evaluator_steps=5,
        encoder_depth=1,
        num_digits=300,
    ),
    # Batch 8: at this scale progress is counted in optimizer steps (the class embedding and the
    # attention take thousands of steps to matter), so many small steps beat fewer large ones.
    "default": Size(budget=3200, eval_every=400, warmup=800, batch=8, seeds=(0, 1, 2), num_samples=200, sample_steps=8),
    "full": Size(
        budget=12800,
        eval_every=800,
        warmup=3200,
        batch=16,
        seeds=(0, 1, 2, 3, 4),
        num_samples=1000,
        sample_steps=16,
        encoder_steps=1500,
        evaluator_steps=1500,
    ),
}


def size_name(args: argparse.Namespace) -> str:
    return "tiny" if args.tiny else "full" if args.full else "default"


def add_study_arguments(parser: argparse.ArgumentParser, out: str, tiny: str, full: str, no_train: str) -> None:
    """The flags the studies share; `out` is the default run directory, the rest are help texts."""
    add_size_arguments(parser, tiny, full)
    parser.add_argument(
        "--out",
        help=f"run directory (checkpoints, logs, json); default {out}, followed by the "
        f"model flags when any is given (e.g. {out}-depth-12)",
    )
    parser.add_argument("--cache", default="runs/bench/cache", help="where the small encoder and evaluator are kept")
    parser.add_argument("--results", default=str(RESULTS), help="markdown file to update")
    add_process_arguments(parser)
    parser.add_argument("--no-train", action="store_true", help=no_train)


def add_process_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once, one process each")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads per run; 1 avoids the stalls of several threads on a shared machine",
    )


def add_size_arguments(parser: argparse.ArgumentParser, tiny: str, full: str) -> None:
    """The flags that give a study's Size (study_size): its size switch (help texts `tiny` and
    `full`), data, model and budget."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--tiny", action="store_true", help=tiny)
    group.add_argument("--full", action="store_true", help=full)
    data = parser.add_argument_group("data (default: the bundled digits at 16x16 with 2x2-pixel patches)")
    data.add_argument(
        "--images",
        default="",
        help="labelled images: an ImageFolder (one sub-folder per class), erw shards stored with images, "
        "or an .npz with `images` uint8 [N, H, W, 3] and `labels`; the encoder and the evaluator "
        "are trained on them (cached by content hash)",
    )
    data.add_argument("--resolution", type=int, default=DIGITS_RESOLUTION, help="images are resized to this side")
    data.add_argument(
        "--patch", type=int, default=DIGITS_PATCH, help="pixels per token side, of the SiT and the encoder"
    )
    model = parser.add_argument_group(
        "model and budget (default: the size's; default size: 6 blocks, L2R depth 2, projector after block 3, "
        "warmup 800 of 3200 steps)"
    )
    model.add_argument("--depth", type=int, help="SiT blocks")
    model.add_argument("--l2r-depth", type=int, help="the first blocks, trained by the ERW warmup")
    model.add_argument(
        "--align-depth", type=int, help="block after which REPA's and ERW's projector reads the hidden state"
    )
    model.add_argument(
        "--warmup", type=int, help="ERW warmup steps, part of the budget (a multiple of the evaluation interval)"
    )
    # The evaluation interval and the warmup stay: a longer budget extends the curves on the same
    # grid, and the warmup becomes a smaller share of it, as in the paper's long runs.
    model.add_argument(
        "--budget-scale",
        type=float,
        default=1.0,
        help="multiplies the budget of optimizer steps; the evaluation interval and the warmup stay",
    )


def study_size(args: argparse.Namespace, seeds: int | None = None) -> Size:
    """The size named by --tiny/--full with the data of --images, --resolution and --patch, the
    model and budget flags, and the first `seeds` seeds (None: the size's)."""
    base = SIZES[size_name(args)]
    model = {name: getattr(args, name) for name in MODEL_FLAGS if getattr(args, name) is not None}
    return dataclasses.replace(
        base,
        images=args.images,
        resolution=args.resolution,
        patch=args.patch,
        **model,
        budget=round(base.budget * args.budget_scale),
        seeds=base.seeds if seeds is None else tuple(range(seeds)),
    )


def data_flags(size: Size) -> str:
    """The command-line flags that give `size`'s data (empty for the digits' defaults)."""
    flags = f" --images {size.images}" if size.images else ""
    if size.resolution != DIGITS_RESOLUTION:
        flags += f" --resolution {size.resolution}"
    if size.patch != DIGITS_PATCH:
        flags += f" --patch {size.patch}"
    return flags


MODEL_FLAGS = ("depth", "l2r_depth", "align_depth", "warmup")  # Size fields set by their own flag


def model_flags(size: Size, base: Size) -> str:
    """The command-line flags that give `size`'s model, budget and seeds over the named size `base`
    (empty when they are the base's)."""
    changed = [name for name in MODEL_FLAGS if getattr(size, name) != getattr(base, name)]
    flags = "".join(f" --{name.replace('_', '-')} {getattr(size, name)}" for name in changed)
    if size.budget != base.budget:
        flags += f" --budget-scale {size.budget / base.budget:g}"
    if size.seeds != base.seeds:
        flags += f" --seeds {len(size.seeds)}"
    return flags


def study_suffix(size: Size, base: Size) -> str:
    """What tells a study with other model flags apart in run directories, result sections and
    pictures ("-depth-12-warmup-400"; empty for the base), so it never overwrites the base study."""
    words = model_flags(size, base).replace("--", "").split()
    return "-" + "-".join(words) if words else ""


def study_out(args: argparse.Namespace, size: Size, default: str) -> Path:
    """--out, or `default` followed by the study's suffix."""
    return Path(args.out) if args.out else Path(default + study_suffix(size, SIZES[size_name(args)]))


def warmup_step_cost(size: Size) -> float:
    """FLOPs of an ERW warmup step (the first l2r_depth blocks and the projector) over a phase-2
    step of the aligned model: what a warmup step saves grows as the L2R blocks become a smaller share."""
    cfg = study_config(size, main_methods(size)[2], 0, Path("."), "")
    dim = encoder_kwargs(size)["embed_dim"]
    return step_flops(cfg, "warmup", dim) / step_flops(cfg, "train", dim)


def main_methods(size: Size) -> list[Method]:
    """Plain SiT, SiT + REPA (constant weight, from scratch), SiT + REPA + ERW (warmup, then the
    decaying weight). The ERW half-life is half of its phase 2, as 50K of the paper's 100K."""
    half_life = max(1, (size.budget - size.warmup) // 2)
    return [
        Method("SiT", align=False),
        Method("SiT+REPA", align=True, overrides=("objective.align_schedule=constant",)),
        Method(
            "SiT+REPA+ERW",
            align=True,
            warmup=size.warmup,
            overrides=("objective.align_schedule=decay", f"objective.align_half_life={half_life}"),
        ),
    ]


def study_config(size: Size, method: Method, seed: int, run_dir: Path, encoder_file: str) -> Config:
    phase = {
        "batch_size": size.batch,
        "lr": size.lr,
        "precision": "fp32",
        "ema_decay": size.ema_decay,
        "ckpt_every": size.budget,
        "keep_last": 1,
        "log_every": size.eval_every,
    }
    tree = {
        "run_id": f"{method.name}-seed{seed}",
        "seed": seed,
        "model": {
            "arch": f"SiT-S/{size.patch}",
            "depth": size.depth,
            "hidden_size": size.hidden,
            "num_heads": size.heads,
            "num_classes": size.num_classes,
            "projector_dim": size.projector_dim,
            "align_depth": size.align_depth,
            "l2r_depth": size.l2r_depth,
        },
        "encoder": {"name": CUSTOM, "weights": encoder_file} if method.align else {"name": "none"},
        "data": {"resolution": size.resolution, "codec": "identity"},
        "warmup": {**phase, "steps": max(method.warmup, 1), "out": str(run_dir / "warmup")},
        "train": {**phase, "steps": size.budget - method.warmup, "out": str(run_dir / "train")},
    }
    return config_from_dict(tree, list(method.overrides))


# ---------------------------------------------------------------------------------------------
# Data.


class DataError(ValueError):
    """--images that the studies cannot use; the message says why."""


@dataclass(frozen=True)
class LabelledImages:
    images: Tensor  # uint8 [N, 3, R, R]
    labels: Tensor  # int64 [N], classes 0..K-1
    name: str  # "digits", or the --images file or folder name

    @classmethod
    def load(cls, size: Size) -> "LabelledImages":
        """The images of `size` (--images, or the digits) at its resolution; the first
        `size.num_digits` only when set (the digits cycle through the classes)."""
        if size.images:
            images, labels = _read_images(size.images, size.resolution)
            name = Path(size.images.rstrip("/")).stem
        else:
            from erw.data.digits import digit_images

            pixels, classes = digit_images()
            images, labels, name = torch.from_numpy(pixels).permute(0, 3, 1, 2), torch.from_numpy(classes), "digits"
        if size.num_digits:
            images, labels = images[: size.num_digits], labels[: size.num_digits]
        if images.shape[-1] != size.resolution:
            pixels = torch.nn.functional.interpolate(images.float(), size=size.resolution, mode="area")
            images = pixels.round().clamp(0, 255).to(torch.uint8)
        data = cls(images.contiguous(), labels.long(), name)
        problems = data.problems()
        if problems:
            raise DataError(f"{size.images or 'the digits'}: " + "; ".join(problems))
        return data

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    def fingerprint(self) -> str:
        """A hash of the pixels and labels: the small networks are cached under it."""
        digest = hashlib.sha256(self.images.numpy().tobytes())
        digest.update(self.labels.numpy().tobytes())
        return digest.hexdigest()[:16]

    def problems(self) -> list[str]:
        if len(self.labels) < 20 or self.labels.min() < 0:
            return [
                f"{len(self.labels)} images with labels from {int(self.labels.min())}: the study needs at least 20, "
                "each with a class label"
            ]
        missing = sorted(set(range(self.num_classes)) - set(self.labels.tolist()))
        return [f"no images of class(es) {missing}: labels must be 0..K-1, each with images"] if missing else []


def _read_images(uri: str, resolution: int) -> tuple[Tensor, Tensor]:
    """uint8 [N, 3, H, W] and labels from an .npz (`images` NHWC and `labels`), an ImageFolder, or
    erw shards stored with images (ADM centre crop to `resolution` for image folders)."""
    if uri.endswith(".npz"):
        arrays = np.load(uri)
        if not {"images", "labels"} <= set(arrays.files):
            raise DataError(
                f"{uri} holds {', '.join(arrays.files)}: expected `images` (uint8 [N, H, W, 3]) and `labels`"
            )
        images = arrays["images"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
            raise DataError(f"{uri}: `images` is {images.dtype} {images.shape}, expected square uint8 [N, H, W, 3]")
        return torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(arrays["labels"].astype(np.int64))
    from erw.data.image_sets import ImageSetError, open_image_set

    try:
        images, labels = zip(*open_image_set(uri).batches(256, resolution=resolution))
    except ImageSetError as err:
        raise DataError(str(err)) from None
    return torch.cat(images), torch.cat(labels)


class ImageBatches:
    """Endless batches {"latent", "label", and "feat" (encoder tokens) when features are given}:
    epochs are permutations drawn from (seed, epoch); the position (batches handed out) is all
    the state a resume needs."""

    def __init__(self, data: LabelledImages, batch_size: int, seed: int, features: Tensor | None = None):
        self.data, self.batch_size, self.seed, self.position = data, batch_size, seed, 0
        self.features = features

    def _index(self, stream_positions: range) -> Tensor:
        n = len(self.data.labels)
        out, cached = [], {}
        for i in stream_positions:
            epoch = i // n
            if epoch not in cached:
                cached[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            out.append(int(cached[epoch][i % n]))
        return torch.tensor(out)

    def __iter__(self):
        while True:
            start = self.position * self.batch_size
            index = self._index(range(start, start + self.batch_size))
            self.position += 1
            batch = {"latent": to_unit_range(self.data.images[index]), "label": self.data.labels[index]}
            if self.features is not None:
                batch["feat"] = self.features[index]
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])


# ---------------------------------------------------------------------------------------------
# The small networks, trained once.


def encoder_kwargs(size: Size) -> dict:
    """The encoder: the token grid of the SiT studied here (one token per patch)."""
    return small_nets.encoder_kwargs(size.resolution, patch_size=size.patch, depth=size.encoder_depth)


def _key(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:10]


def untrained_encoder(cache: Path, size: Size) -> str:
    """The encoder's architecture with its initial weights: the control for encoder quality."""
    kwargs = encoder_kwargs(size)
    file = cache / f"encoder-untrained-{_key(kwargs, small_nets.ENCODER_TIMM_NAME)}.safetensors"
    if not file.exists():
        torch.manual_seed(0)
        small_nets.save_encoder(small_nets.build_encoder(kwargs), kwargs, str(file))
    return str(file)


@dataclass
class SmallNets:
    encoder_file: str
    evaluator_file: str
    reports: dict[str, dict]


def ensure_small_nets(cache: Path, data: LabelledImages, size: Size, log: Callable[[str], None]) -> SmallNets:
    """Train the encoder and the evaluator unless files for the same data and settings are in `cache`."""
    cache.mkdir(parents=True, exist_ok=True)
    # Shifts of up to one pixel at 16x16: half a pixel of the 8x8 scans, as 2 pixels at 32x32.
    shift = max(1, size.resolution // 16)
    # lr 3e-3: at 1e-3 the 600-step encoder underfits (85.8% held out, below a linear probe on the
    # pixels); at 3e-3 it reaches 95.8% (measured, batch 128).
    encoder_settings = small_nets.FitSettings(steps=size.encoder_steps, seed=0, max_shift=shift, lr=3e-3)
    evaluator_settings = small_nets.FitSettings(steps=size.evaluator_steps, seed=1, max_shift=shift)
    kwargs = encoder_kwargs(size)

    # The data (by content) and the architecture are part of the key: a changed dataset or network
    # is retrained, never silently reused.
    content = data.fingerprint()
    encoder_key = _key(encoder_settings, kwargs, small_nets.ENCODER_TIMM_NAME, content)
    encoder_file = cache / f"{data.name}-encoder-{encoder_key}.safetensors"
    evaluator_arch = repr(
        small_evaluator.DigitEvaluator(data.num_classes)
    )  # exported for one input size: part of the key
    evaluator_file = (
        cache / f"{data.name}-evaluator-{_key(evaluator_settings, evaluator_arch, size.resolution, content)}.pt2"
    )
    reports_file = cache / "small-nets.json"
    reports = json.loads(reports_file.read_text()) if reports_file.exists() else {}
    if not encoder_file.exists() or encoder_file.name not in reports:
        log(f"training the encoder -> {encoder_file}")
        vit, report = small_nets.fit_encoder(data.images, data.labels, encoder_settings, kwargs, log=lambda _: None)
        small_nets.save_encoder(vit, kwargs, str(encoder_file))
        reports[encoder_file.name] = dataclasses.asdict(report)
        log(f"encoder: {report.describe()}")
    if not evaluator_file.exists() or evaluator_file.name not in reports:
        log(f"training the evaluator -> {evaluator_file}")
        net, report = small_evaluator.fit_evaluator(data.images, data.labels, evaluator_settings, log=lambda _: None)
        small_evaluator.save_evaluator(net, str(evaluator_file), size.resolution)
        reports[evaluator_file.name] = dataclasses.asdict(report)
        log(f"evaluator: {report.describe()}")
    reports_file.write_text(json.dumps(reports, indent=2))
    return SmallNets(
        str(encoder_file),
        str(evaluator_file),
        {"encoder": reports[encoder_file.name], "evaluator": reports[evaluator_file.name]},
    )


class Evaluator:
    """Fréchet distance to the real images in the evaluator's features, and the class accuracy
    of generated images for their conditioning label. The network is the exported program,
    loaded as `erw evaluate --feature-network` loads it."""

    def __init__(self, uri: str, data: LabelledImages, num_samples: int):
        self.network = load_feature_network(uri)
        real = self._features(data.images)[0]
        self.reference = Gaussian.fit(real)
        self.dim = real.shape[1]
        # The distance a perfect generator gets with this many samples: the floor of the curves.
        rng = np.random.default_rng(0)
        self.floor = float(
            np.mean(
                [
                    frechet_distance(
                        Gaussian.fit(real[rng.choice(len(real), num_samples, replace=False)]), self.reference
                    )
                    for _ in range(5)
                ]
            )
        )

    @torch.no_grad()
    def _features(self, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
        out = [self.network(images[i : i + 500]) for i in range(0, len(images), 500)]
        return torch.cat([o["pool"] for o in out]).numpy(), torch.cat([o["logits"] for o in out])

    def score(self, images: Tensor, labels: Tensor) -> dict[str, float]:
        pool, logits = self._features(images)
        return {
            "fd": frechet_distance(Gaussian.fit(pool), self.reference),
            "accuracy": float((logits.argmax(dim=1) == labels).float().mean()),
        }


# ---------------------------------------------------------------------------------------------
# Cost.


def encoder_flops(encoder: torch.nn.Module, resolution: int) -> float:
    """Forward FLOPs of the encoder per image, counted by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        encoder(torch.zeros(1, 3, resolution, resolution, dtype=torch.uint8))
    return float(counter.get_total_flops())


def step_flops(cfg: Config, phase: str, encoder_dim: int | None) -> float:
    """FLOPs of one optimizer step: forward + backward (3 forwards) of the model trained in that phase."""
    model = build_model(cfg, phase, encoder_dim)
    return getattr(cfg, phase).batch_size * 3 * flops_per_image(model)


_FEATURES: dict[tuple[str, int], Tensor] = {}


@torch.no_grad()
def encoder_features(encoder_file: str, encoder: torch.nn.Module, data: LabelledImages) -> Tensor:
    """The encoder's tokens of every image (`--store features`), computed once per encoder file."""
    key = (encoder_file, len(data.labels))
    if key not in _FEATURES:
        _FEATURES[key] = torch.cat([encoder(data.images[i : i + 500]) for i in range(0, len(data.images), 500)])
    return _FEATURES[key]


# ---------------------------------------------------------------------------------------------
# One run.


@dataclass
class Curve:
    method: str
    seed: int
    points: list[dict[str, float]] = field(default_factory=list)  # step, flops, fd, accuracy, loss
    seconds: float = 0.0
    final_checkpoint: str = ""


def ema_model(cfg: Config, ema_state: dict[str, Tensor], encoder_dim: int | None) -> torch.nn.Module:
    """The phase-2 model of `cfg` holding a checkpoint's EMA weights, for evaluation."""
    model = build_model(cfg, "train", encoder_dim)
    model.load_state_dict(ema_state)
    return model.eval()


@torch.no_grad()
def generate(model: torch.nn.Module, size: Size) -> tuple[Tensor, Tensor]:
    """Class-balanced samples: Heun ODE, no guidance, fixed noise."""
    labels = torch.arange(size.num_samples) % size.num_classes
    noise = PerSampleNoise(SAMPLE_SEED, range(size.num_samples), (3, size.resolution, size.resolution), "cpu")
    latents = sample(model_velocity(model), noise, labels, mode="ode", steps=size.sample_steps, solver="heun")
    return to_uint8(latents), labels  # identity codec: model space is pixels in [-1, 1]


def train_and_evaluate(
    method: Method,
    size: Size,
    seed: int,
    run_dir: Path,
    data: LabelledImages,
    nets: SmallNets,
    evaluator: Evaluator,
    log: Callable[[str], None],
) -> Curve:
    """Train one method for the whole budget, scoring the EMA model every eval_every steps."""
    shutil.rmtree(run_dir, ignore_errors=True)  # resume="auto" below must only see this run's checkpoints
    run_dir.mkdir(parents=True)
    trainer_log = (run_dir / "trainer.log").open("a", buffering=1)

    def quiet(message: str) -> None:
        trainer_log.write(message + "\n")

    cfg = study_config(size, method, seed, run_dir, nets.encoder_file)
    encoder = load_encoder(cfg.encoder, size.resolution) if method.align else None
    encoder_dim = encoder.dim if encoder is not None else None
    features = encoder_features(cfg.encoder.weights, encoder, data) if encoder is not None else None
    # Aligned methods pay once for the encoder's tokens of the dataset, then nothing per step.
    feature_flops = len(data.labels) * encoder_flops(encoder, size.resolution) if encoder is not None else 0.0
    full_step = step_flops(cfg, "train", encoder_dim)
    curve = Curve(method.name, seed)
    started = time.perf_counter()
    init_from = None
    if method.warmup:
        warm = run(cfg, "warmup", ImageBatches(data, size.batch, seed, features), CPU, encoder=encoder, log=quiet)
        init_from = warm.checkpoint
    curve.seconds = time.perf_counter() - started  # training time only; evaluation is not counted
    warmup_flops = method.warmup * step_flops(cfg, "warmup", encoder_dim) if method.warmup else 0.0
    batches = ImageBatches(data, size.batch, seed, features)
    for end in range(size.eval_every, cfg.train.steps + 1, size.eval_every):
        segment = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=end))
        started = time.perf_counter()
        result = run(segment, "train", batches, CPU, encoder=encoder, init_from=init_from, resume="auto", log=quiet)
        if result.preempted:  # SIGTERM: the trainer saved a checkpoint; stop rather than train on
            raise SystemExit(
                f"{method.name} seed {seed} stopped by SIGTERM at step {result.step} ({result.checkpoint})"
            )
        curve.seconds += time.perf_counter() - started
        init_from = None  # later segments resume from the checkpoint, which already holds the hand-off
        state = ckpt.load_checkpoint(result.checkpoint, with_train_state=False).ema_state
        images, labels = generate(ema_model(cfg, state, encoder_dim), size)
        scores = evaluator.score(images, labels)
        step = method.warmup + end
        curve.points.append(
            {
                "step": step,
                "flops": feature_flops + warmup_flops + end * full_step,
                **scores,
                "loss_denoise": result.history[-1]["loss_denoise"],
            }
        )
        log(
            f"  {method.name:<13} seed {seed} step {step:>5}: FD {scores['fd']:8.2f}  accuracy {100 * scores['accuracy']:5.1f}%"
        )
        curve.final_checkpoint = result.checkpoint
    trainer_log.close()
    return curve


@dataclass(frozen=True)
class Task:
    """One run of a study: a method, a seed, and where its checkpoints go."""

    method: Method
    seed: int
    run_dir: Path


_WORKER: dict[str, object] = {}


def _die_with_parent() -> None:
    """A pool worker outlives a killed study and keeps training; on Linux, ask the kernel to kill
    it with its parent (elsewhere, kill the process group). SIGKILL, because the trainer takes
    SIGTERM as a preemption: it checkpoints, and the next segment would train on."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _start_worker(threads: int, size: Size, nets: SmallNets) -> None:
    _die_with_parent()
    torch.set_num_threads(threads)
    data = LabelledImages.load(size)
    _WORKER.update(size=size, nets=nets, data=data, evaluator=Evaluator(nets.evaluator_file, data, size.num_samples))


def _run_task(task: Task) -> Curve:
    w = _WORKER
    log = lambda message: print(message, flush=True)
    return train_and_evaluate(
        task.method, w["size"], task.seed, task.run_dir, w["data"], w["nets"], w["evaluator"], log
    )


def train_all(tasks: list[Task], size: Size, nets: SmallNets, jobs: int, threads: int) -> list[Curve]:
    """Curves of every task, in order, from `jobs` processes of `threads` torch threads each. The
    runs are independent and deterministic, so the curves do not depend on `jobs`; on few cores,
    one thread per process beats several threads per run (small matrices scale badly)."""
    if jobs <= 1:
        _start_worker(threads, size, nets)
        return [_run_task(task) for task in tasks]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(
        jobs,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(threads, size, nets),
    ) as pool:
        return list(pool.map(_run_task, tasks))


# ---------------------------------------------------------------------------------------------
# Reading curves.


def evaluation_step(size: Size, fraction: float) -> int:
    """The first evaluation at or after `fraction` of the budget."""
    return -(-round(fraction * size.budget) // size.eval_every) * size.eval_every


def steps_to_target(points: list[dict[str, float]], target: float, key: str = "step") -> float | None:
    """`key` (step or flops) where the FD curve first reaches the target: linear between the last
    evaluation above it and the first at or below it (that evaluation itself if it is the first).
    Reading off the evaluation grid alone would round every method up to a multiple of eval_every."""
    previous = None
    for point in points:
        if point["fd"] <= target:
            if previous is None:
                return point[key]
            fraction = (previous["fd"] - target) / (previous["fd"] - point["fd"])
            return previous[key] + fraction * (point[key] - previous[key])
        previous = point
    return None


def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


# ---------------------------------------------------------------------------------------------
# Where the representation lives: a linear probe per block.


def final_model(checkpoint: str) -> tuple[Config, torch.nn.Module]:
    """The config and the EMA model of a run's checkpoint."""
    saved = ckpt.load_checkpoint(checkpoint, with_train_state=False)
    cfg = saved.config()
    encoder_dim = load_encoder(cfg.encoder, cfg.data.resolution).dim if cfg.encoder.name != "none" else None
    return cfg, ema_model(cfg, saved.ema_state, encoder_dim)


@torch.no_grad()
def block_features(model: torch.nn.Module, path: str, data: LabelledImages, t: float) -> list[np.ndarray]:
    """Mean-pooled hidden state after every block for all images noised to time t, with the
    null class as the label (a class-conditional model would otherwise be handed the answer)."""
    captured: list[list[Tensor]] = [[] for _ in model.blocks]
    hooks = [
        block.register_forward_hook(lambda _m, _i, out, i=i: captured[i].append(out.mean(dim=1)))
        for i, block in enumerate(model.blocks)
    ]
    noise = torch.randn(data.images.shape, generator=torch.Generator().manual_seed(PROBE_SPLIT_SEED))
    times = torch.full((len(data.labels),), t)
    x_t, _ = interpolate(path, to_unit_range(data.images), noise, times)
    null = torch.full_like(data.labels, model.y_embedder.num_classes)
    for i in range(0, len(x_t), 500):
        model(x_t[i : i + 500], times[i : i + 500], null[i : i + 500])
    for hook in hooks:
        hook.remove()
    return [torch.cat(c).numpy() for c in captured]


@torch.no_grad()
def conditioning_strength(model: torch.nn.Module) -> dict[str, float]:
    """The class label and the time enter the adaLN conditioning as a sum of two embeddings:
    how far apart the class embeddings are (mean distance to their centre) against the size of
    the timestep embedding (mean norm over t in [0, 1]) says how much the label can steer."""
    classes = model.y_embedder.embedding_table.weight[: model.y_embedder.num_classes]
    spread = (classes - classes.mean(dim=0)).norm(dim=1).mean()
    time_norm = model.t_embedder(torch.linspace(0, 1, 11)).norm(dim=1).mean()
    return {"class_spread": float(spread), "time_norm": float(time_norm)}


def probe_accuracy(features: np.ndarray, labels: Tensor) -> float:
    """Held-out accuracy of a linear probe (ridge classifier on standardised features): closed
    form, so no optimiser settings sway the comparison between models."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train, test = (i.numpy() for i in small_nets.split_indices(len(labels), 0.3, PROBE_SPLIT_SEED))
    y = labels.numpy()
    probe = make_pipeline(StandardScaler(), RidgeClassifier(alpha=1.0))
    probe.fit(features[train], y[train])
    return float(probe.score(features[test], y[test]))
