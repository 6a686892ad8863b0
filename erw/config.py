"""Typed configuration: dataclasses, YAML presets, dotted command-line overrides, validation.

A run is described by one `Config`. It is built from a YAML file plus overrides such as
`train.lr=2e-4`, validated once before any compute, and stored inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from erw.encoder_registry import ENCODERS
from erw.errors import ErwError

SIT_PRESETS = {  # name -> (depth, hidden_size, num_heads); patch size comes from the "/p" suffix
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
# Alignment weight c0 by model size (ERW, phase 2).
ALIGN_COEFF_BY_SIZE = {"S": 1.0, "B": 1.0, "L": 3.0, "XL": 6.0}

# The allowed values of every enumerated setting, declared once: `_coerce` checks them when a
# config is built, and the command lines take their `choices` from here.
InterpolantPath = Literal["linear", "cosine"]
TimeSampling = Literal["uniform", "lognormal"]
AlignSchedule = Literal["decay", "constant"]  # decay: c0 * 2^(-(s - W) / half_life); constant: c0 (REPA)
Precision = Literal["fp32", "bf16", "fp16"]
SamplerMode = Literal["sde", "ode"]
OdeSolver = Literal["euler", "heun"]
# trapezoid: the corrector on every step, guided by its own time; repa: REPA's samplers.py (no
# corrector on the last step, the corrector guided iff the predictor's time is in the interval).
HeunConvention = Literal["trapezoid", "repa"]
Codec = Literal["identity", "sd-vae-ft-ema", "sd-vae-ft-mse"]  # identity stores pixels in [-1, 1]
LatentNormMode = Literal["scale", "channel"]  # latent * scaling factor | per-channel (latent - mean) / std
ShardStore = Literal["images", "features"]  # beside the latents: the centre crop | cached encoder tokens
ImageFormat = Literal["png", "jpg", "npy"]  # the stored crop: lossless | quality 95, smallest | raw pixels


def choices(literal: Any) -> tuple[str, ...]:
    """The allowed values of one of the Literal types above."""
    return typing.get_args(literal)


def closest(value: Any, known: Any) -> str | None:
    """The known name a mistyped one most likely meant (for "did you mean" hints), or None."""
    found = difflib.get_close_matches(str(value), [str(k) for k in known], n=1)
    return found[0] if found else None


def literal_mismatch(value: Any, literal: Any) -> tuple[str, str] | None:
    """None when value is one of the Literal's values, else (the allowed values, a did-you-mean hint)."""
    allowed = typing.get_args(literal)
    if value in allowed:
        return None
    close = closest(value, allowed)
    return ", ".join(map(str, allowed)), f" (did you mean {close!r}?)" if close else ""


class ConfigError(ErwError):
    """A configuration that cannot work. The message lists every problem, one per line."""

    def __init__(self, *lines: str):
        self.lines = list(lines)
        super().__init__(lines[0] if len(lines) == 1 else "invalid configuration:\n  - " + "\n  - ".join(lines))


def parse_arch(arch: str) -> tuple[str, int]:
    """'SiT-XL/2' -> ('XL', 2)."""
    try:
        family, patch = arch.split("/")
        size = family.split("-", 1)[1]
        patch_size = int(patch)
    except (ValueError, IndexError):
        raise ConfigError(f"model.arch={arch!r} is not of the form 'SiT-<S|B|L|XL>/<2|4|8>'") from None
    if family.split("-", 1)[0] != "SiT" or size not in SIT_PRESETS or patch_size not in (1, 2, 4, 8):
        raise ConfigError(f"model.arch={arch!r} is not one of SiT-{{S,B,L,XL}}/{{2,4,8}}")
    return size, patch_size


@dataclass
class ModelConfig:
    arch: str = "SiT-XL/2"
    # Optional overrides of the preset, for small models (None keeps the preset's value).
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    qk_norm: bool = False
    rope: bool = False
    num_classes: int = 1000
    class_dropout: float = 0.1
    projector_dim: int = 2048
    align_depth: int = 14  # block after which the phase-2 projector reads the hidden state
    l2r_depth: int = 4  # number of early blocks trained in the ERW warmup

    @property
    def size(self) -> str:
        return parse_arch(self.arch)[0]

    @property
    def patch_size(self) -> int:
        return parse_arch(self.arch)[1]

    def dims(self) -> tuple[int, int, int]:
        """(depth, hidden_size, num_heads) after overrides."""
        depth, hidden, heads = SIT_PRESETS[self.size]
        return (self.depth or depth, self.hidden_size or hidden, self.num_heads or heads)


@dataclass
class EncoderConfig:
    name: str = "dinov2-vit-b"  # registry name; "none" trains without alignment (plain SiT)
    weights: str = ""  # local file or s3:// URI; empty = timm's hub (needs a network)
    dim: int | None = None  # expected token width; checked against the encoder when set


@dataclass
class DataConfig:
    source: str = ""  # images to precompute: ImageFolder or image tar shards, local or s3://
    shards: str = ""  # latent shards (the directory that holds manifest.json), local or s3://
    resolution: int = 256
    codec: Codec = "sd-vae-ft-ema"
    codec_weights: str = ""  # diffusers AutoencoderKL directory, local or s3://; empty = hub
    num_workers: int = 4
    shuffle_buffer: int = 2000  # samples held per partition (a rank reads global batch / world size of them)
    max_bad_samples: int = 100  # per loader worker: bad samples dropped and named before training stops

    @property
    def latent_channels(self) -> int:
        return 3 if self.codec == "identity" else 4

    @property
    def latent_downsample(self) -> int:
        return 1 if self.codec == "identity" else 8

    @property
    def latent_size(self) -> int:
        return self.resolution // self.latent_downsample


@dataclass
class PrecomputeConfig:
    """How `erw precompute` encodes data.source into data.shards, besides data's resolution and codec."""

    cache: str = ""  # the store of encoded units for these settings, shared by datasets; empty = data.shards
    latent_norm: LatentNormMode = "scale"
    store: ShardStore = "images"  # features: encoder.name's tokens, for training without the encoder
    image_format: ImageFormat = "png"  # npy: no decoding in the loader, largest
    batch_size: int = 64  # images per codec (and encoder) call
    shard_size: int = 1000  # images per shard of an ImageFolder source
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N


@dataclass
class ObjectiveConfig:
    path: InterpolantPath = "linear"
    time_sampling: TimeSampling = "uniform"
    lognormal_mean: float = 0.0
    lognormal_std: float = 1.0
    align_coeff: float | None = None  # c0; None = by model size (XL 6, L 3, B/S 1); 0 = no alignment
    align_schedule: AlignSchedule = "decay"
    align_half_life: int = 50_000

    def resolved_align_coeff(self, model: ModelConfig) -> float:
        return ALIGN_COEFF_BY_SIZE[model.size] if self.align_coeff is None else self.align_coeff


@dataclass
class PhaseConfig:
    """Optimisation settings of one phase (warmup or train); one trainer runs both."""

    steps: int = 100_000
    batch_size: int = 256  # global, across all ranks and accumulation steps
    grad_accum: int = 1
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    precision: Precision = "bf16"
    compile: bool = False
    fused_optimizer: bool | None = None  # AdamW as one fused kernel; None = on for CUDA, off elsewhere
    # train only: false lets phase 2 differ from its warmup in model.rope (RoPE has no parameters),
    # e.g. the ERW reference's 2-D RoPE after a warmup without it; every other mismatch is refused.
    rope_from_warmup: bool = True
    ckpt_every: int = 10_000
    keep_last: int = 3  # newest committed checkpoints kept; older ones are deleted
    # Write checkpoints in the background while training continues. None = on for CUDA, off on a
    # CPU, where the write competes with the step for the cores (bench/checkpoint_throughput.py).
    async_checkpoint: bool | None = None
    # After SIGTERM: the seconds a preemption checkpoint may take, counted from the signal. None =
    # what `erw torchrun` grants its workers (its shutdown timeout minus a margin; `erw launch` sets
    # that from the pod's grace period), else 25 s (plain torchrun and Kubernetes wait 30 s).
    # A value set here must stay below the time the platform waits before SIGKILL.
    grace_period_s: float | None = None
    log_every: int = 100
    max_nonfinite: int = 10  # stop after this many non-finite losses in a row
    out: str = ""  # checkpoint directory, local or s3://

    def use_fused_optimizer(self, device_type: str) -> bool:
        return device_type == "cuda" if self.fused_optimizer is None else self.fused_optimizer

    def use_async_checkpoint(self, device_type: str) -> bool:
        return device_type == "cuda" if self.async_checkpoint is None else self.async_checkpoint


@dataclass
class SampleConfig:
    mode: SamplerMode = "sde"
    solver: OdeSolver = "euler"  # used by mode ode
    heun_convention: HeunConvention = "trapezoid"  # repa: to compare FIDs with REPA's published sampler
    steps: int = 250
    cfg_scale: float = 1.0
    guidance_low: float = 0.0
    guidance_high: float = 1.0
    num_samples: int = 50_000
    batch_size: int = 64
    use_ema: bool = True


@dataclass
class EvalConfig:
    reference: str = ""  # ADM reference batch .npz, or image shards/folder to compute stats from
    inception_weights: str = ""  # torch-fidelity Inception weights, local or s3://
    feature_network: str = ""  # optional small feature network checkpoint (small datasets)


@dataclass
class PromoteConfig:
    # The smallest FID improvement that publishes. Measured on the demo model (bench/fid_noise.py,
    # 16 sampling seeds, 200 samples): FID 0.871 +- 0.034; 3 standard deviations is 0.10. The
    # spread shrinks about as 1/sqrt(samples), so at ImageNet's 50K samples 0.1 is conservative.
    margin: float = 0.1


@dataclass
class MetricsConfig:
    port: int = 0  # base port of each rank's /metrics (rank r serves port + local rank); 0 = off
    pushgateway: str = ""  # host:port of a Pushgateway for batch steps; empty = off


@dataclass
class Config:
    run_id: str = ""
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    precompute: PrecomputeConfig = field(default_factory=PrecomputeConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    warmup: PhaseConfig = field(default_factory=PhaseConfig)
    train: PhaseConfig = field(default_factory=PhaseConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Building configs from dicts, YAML files and overrides.


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML value to the annotated field type, or raise ConfigError naming the key."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        if mismatch := literal_mismatch(value, annotation):
            raise ConfigError(f"{where}={value!r} is not one of {mismatch[0]}{mismatch[1]}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(annotation)):
            raise ConfigError(f"{where}: expected a list of {len(typing.get_args(annotation))} numbers, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, typing.get_args(annotation)))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        return "" if value is None else str(value)
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs, found = {}, []
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            close = closest(key, names)
            hint = f" (did you mean {close!r}?)" if close else f" (known: {', '.join(names)})"
            found.append(f"unknown config key {path!r}{hint}")
            continue
        hint = hints[key]
        try:
            kwargs[key] = (
                _build(hint, value or {}, path) if dataclasses.is_dataclass(hint) else _coerce(value, hint, path)
            )
        except ConfigError as err:
            found.extend(err.lines)
    if found:
        raise ConfigError(*found)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=2e-4' -> ('train.lr', 0.0002). Values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    # YAML reads 2e-4 as a string (it wants 2.0e-4); accept the form everyone types.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            pass
    return key.strip(), value


def config_from_dict(data: dict[str, Any], overrides: list[str] = ()) -> Config:
    tree = dict(data or {})
    tree = yaml.safe_load(yaml.safe_dump(tree))  # deep copy
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return _build(Config, tree, "")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML preset (or start from defaults when path is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist (presets live in configs/)")
        text = path.read_text()
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    return config_from_dict(data, overrides)


# ---------------------------------------------------------------------------------------------
# Validation: every problem in one message, before any compute.


def problems(cfg: Config, world_size: int = 1, phase: str | None = None) -> list[str]:
    """All reasons this config cannot work, as readable lines (empty when it is fine)."""
    out: list[str] = []
    model, data, objective = cfg.model, cfg.data, cfg.objective
    try:
        size, patch = parse_arch(model.arch)
    except ConfigError as err:
        return [str(err)]
    depth, hidden, heads = model.dims()
    if depth < 1 or hidden < 1 or heads < 1:
        out.append(f"model depth/hidden_size/num_heads must be positive, got {depth}/{hidden}/{heads}")
    elif hidden % heads or hidden % 4:
        why = "num_heads" if hidden % heads else "4 (the 2-D sin-cos position embedding)"
        out.append(f"model.hidden_size={hidden} is not divisible by {why}")
    elif model.rope and (hidden // heads) % 4:
        out.append(f"model.rope needs a head dimension divisible by 4, got {hidden // heads}")
    if not 1 <= model.l2r_depth < depth:
        out.append(
            f"model.l2r_depth={model.l2r_depth} must be at least 1 and less than the model depth {depth} "
            "(the warmup trains a strict prefix of the blocks)"
        )
    if not 1 <= model.align_depth <= depth:
        out.append(f"model.align_depth={model.align_depth} is outside the model: choose 1..{depth}")
    if model.num_classes < 1:
        out.append(f"model.num_classes must be at least 1, got {model.num_classes}")
    if not 0.0 <= model.class_dropout < 1.0:
        out.append(f"model.class_dropout={model.class_dropout} must be in [0, 1)")
    step = data.latent_downsample * patch
    if data.resolution <= 0 or data.resolution % step:
        out.append(
            f"data.resolution={data.resolution} must be a positive multiple of {step} "
            f"(codec downsampling {data.latent_downsample} x patch size {patch})"
        )
    if objective.align_half_life <= 0:
        out.append(f"objective.align_half_life must be positive, got {objective.align_half_life}")
    if objective.align_coeff is not None and objective.align_coeff < 0:
        out.append(f"objective.align_coeff must be >= 0, got {objective.align_coeff}")
    out += _encoder_problems(cfg, phase)
    phases = [phase] if phase else ["warmup", "train"]
    for name in phases:
        out += _phase_problems(name, getattr(cfg, name), world_size)
    out += sample_problems(cfg.sample)
    if cfg.metrics.port < 0 or cfg.metrics.port > 65535:
        out.append(f"metrics.port={cfg.metrics.port} is not a TCP port (0 turns the exporter off)")
    return out


def sample_problems(sample: SampleConfig) -> list[str]:
    """The sampler settings' problems; `erw sample` checks its command-line overrides with it too."""
    out = []
    for key in ("steps", "num_samples", "batch_size"):
        if getattr(sample, key) < 1:
            out.append(f"sample.{key} must be at least 1, got {getattr(sample, key)}")
    if sample.cfg_scale < 0:
        out.append(f"sample.cfg_scale must be >= 0 (1 = no guidance), got {sample.cfg_scale}")
    if not 0.0 <= sample.guidance_low <= sample.guidance_high <= 1.0:
        out.append(f"sample guidance interval [{sample.guidance_low}, {sample.guidance_high}] must lie inside [0, 1]")
    return out


def _encoder_problems(cfg: Config, phase: str | None) -> list[str]:
    enc = cfg.encoder
    if enc.name == "none":
        if phase == "warmup":
            return ["the ERW warmup aligns to a representation: set encoder.name (encoder.name=none is plain SiT)"]
        return []
    spec = ENCODERS.get(enc.name)
    if spec is None:
        close = closest(enc.name, ENCODERS)
        hint = f" (did you mean {close!r}?)" if close else ""
        return [f"encoder.name={enc.name!r} is not a known encoder{hint}; known: {', '.join(sorted(ENCODERS))}, none"]
    if enc.dim is not None and spec.dim is not None and enc.dim != spec.dim:
        return [f"encoder.dim={enc.dim} does not match {enc.name}, whose tokens are {spec.dim}-dimensional"]
    if spec.dim is not None:  # a custom encoder's token grid is only known from its weights file
        try:
            spec.grid(cfg.data.resolution)
        except ErwError as err:
            return [str(err)]
    return []


def _phase_problems(name: str, phase: PhaseConfig, world_size: int) -> list[str]:
    out = []
    if phase.steps < 1:
        out.append(f"{name}.steps must be at least 1, got {phase.steps}")
    if phase.grad_accum < 1:
        out.append(f"{name}.grad_accum must be at least 1, got {phase.grad_accum}")
    elif phase.batch_size < 1 or phase.batch_size % (world_size * phase.grad_accum):
        out.append(
            f"{name}.batch_size={phase.batch_size} is not divisible by world size {world_size} x "
            f"{name}.grad_accum={phase.grad_accum}: every rank needs the same whole micro-batch"
        )
    if phase.lr <= 0:
        out.append(f"{name}.lr must be positive, got {phase.lr}")
    if not 0.0 <= phase.ema_decay < 1.0:
        out.append(f"{name}.ema_decay={phase.ema_decay} must be in [0, 1)")
    if phase.ckpt_every < 1:
        out.append(f"{name}.ckpt_every must be at least 1, got {phase.ckpt_every}")
    if phase.keep_last < 1:
        out.append(f"{name}.keep_last must be at least 1, got {phase.keep_last}")
    if phase.log_every < 1:
        out.append(f"{name}.log_every must be at least 1, got {phase.log_every}")
    if phase.max_nonfinite < 1:
        out.append(f"{name}.max_nonfinite must be at least 1, got {phase.max_nonfinite}")
    if phase.grace_period_s is not None and phase.grace_period_s < 0:
        out.append(f"{name}.grace_period_s must be >= 0, got {phase.grace_period_s}")
    if name == "warmup" and not phase.rope_from_warmup:
        out.append("warmup.rope_from_warmup applies to the hand-off into phase 2: set train.rope_from_warmup instead")
    return out


def validate(cfg: Config, world_size: int = 1, phase: str | None = None) -> Config:
    """Raise ConfigError listing every problem; return cfg unchanged when it is valid."""
    found = problems(cfg, world_size, phase)
    if found:
        raise ConfigError(*found)
    return cfg
