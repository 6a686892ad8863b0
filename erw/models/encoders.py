"""Frozen representation encoders: the targets of the alignment loss.

Every encoder is a timm vision transformer mapping images to patch tokens [N, T, D]. The token
grid follows REPA: one token per 16x16 pixels of the training image, so a 256px image gives a
16x16 grid for every encoder (patch-14 models read it at 224px, patch-16 models at 256px, the
position embedding resampled to match).

Weights (`encoder.weights`): a local path or s3:// URI to a safetensors file or a torch state dict
(official DINOv2, MAE, MoCo v3, I-JEPA and OpenAI CLIP files load as they are); empty = timm's
hub (needs a network); "random" = untrained weights, for tests and demos only.

Custom encoders ("timm-file"): a safetensors file written by `save_encoder_file`, which stores the
timm architecture, its keyword arguments and the preprocessing in the file's metadata, so a small
encoder trained for this project (say a tiny ViT on digits) needs no code change to be used.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import pickle
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from erw import storage
from erw.config import EncoderConfig
from erw.encoder_registry import CUSTOM, ENCODERS, IMAGENET_MEAN, IMAGENET_STD, EncoderError, EncoderSpec

METADATA_KEY = "erw.encoder"


class FrozenEncoder(nn.Module):
    """uint8 images [N, 3, R, R] (or floats in [0, 1]) -> patch tokens [N, T, D] in float32."""

    def __init__(self, spec: EncoderSpec, model: nn.Module, resolution: int):
        super().__init__()
        self.spec, self.model, self.resolution = spec, model, resolution
        self.input_resolution = spec.input_resolution(resolution)
        self.dim, self.num_tokens = spec.dim, spec.num_tokens(resolution)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenEncoder:
        return super().train(False)  # frozen: stays in eval mode whatever its parent does

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.resolution, self.resolution):
            raise EncoderError(
                f"encoder {self.spec.name} expects images [N, 3, {self.resolution}, {self.resolution}], "
                f"got {tuple(images.shape)}"
            )
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        if x.shape[-1] != self.input_resolution:
            x = F.interpolate(x, size=(self.input_resolution,) * 2, mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        # bf16 on GPU as in REPA; on CPU fp32, also when the caller runs under CPU autocast
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            tokens = self.model.forward_features(x)
        return tokens[:, self.spec.prefix_tokens :].float()


# ---------------------------------------------------------------------------------------------
# Building and loading.


def build_encoder_model(spec: EncoderSpec, resolution: int, pretrained: bool = False) -> nn.Module:
    """The timm model for `spec` at the input size `resolution` implies, without a classifier head.
    Works under `torch.device("meta")` for shape checks without memory."""
    import timm

    kwargs = {**spec.timm_kwargs, "img_size": spec.input_resolution(resolution), "num_classes": 0}
    return timm.create_model(spec.timm_name, pretrained=pretrained, **kwargs)


def read_weights(uri: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) from a safetensors file or a torch state dict, local or s3://."""
    try:
        data = storage.read_bytes(uri)
    except (OSError, storage.StorageError) as err:
        raise EncoderError(f"cannot read encoder weights {uri}: {err}") from None
    header = int.from_bytes(data[:8], "little") if len(data) > 8 else 0
    if 0 < header < len(data) and data[8:9] == b"{":
        from safetensors.torch import load

        metadata = json.loads(data[8 : 8 + header]).get("__metadata__") or {}
        return load(data), metadata
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise EncoderError(
            f"{uri} is neither a safetensors file nor a state dict torch.load accepts with weights_only=True "
            f"(objects other than tensors are refused): {str(err).splitlines()[0]}"
        ) from None
    while isinstance(obj, dict):  # checkpoint wrappers around the weights
        inner = next(
            (obj[k] for k in ("state_dict", "model", "teacher", "encoder") if isinstance(obj.get(k), dict)), None
        )
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise EncoderError(f"{uri} does not hold a state dict (a mapping of names to tensors)")
    return obj, {}


def resample_pos_embed(pos_embed: Tensor, grid: int) -> Tensor:
    """Resample a [1, prefix + S*S, D] absolute position embedding to a grid x grid one.

    The prefix (class token positions) is the part that is not a square; bicubic with
    antialiasing, as REPA resampled DINOv2's 37x37 table to 16x16."""
    from timm.layers import resample_abs_pos_embed

    side = math.isqrt(pos_embed.shape[1])
    if side == grid:
        return pos_embed
    prefix = pos_embed.shape[1] - side * side
    return resample_abs_pos_embed(pos_embed, [grid, grid], [side, side], num_prefix_tokens=prefix)


def _select_backbone(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keep the encoder proper: strip DDP's "module.", DINO's "backbone." and keep MoCo v3's online
    "base_encoder." (dropping its momentum encoder and predictor)."""
    for prefix in ("module.", "backbone.", "base_encoder."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _fit_state_dict(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Convert a checkpoint to the timm model's names and shapes (official formats included)."""
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    state = dict(_select_backbone(state))  # a copy: the caller's dict stays as it was
    if "pos_embed" in state and getattr(model, "pos_embed", None) is not None:
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], model.patch_embed.grid_size[0])
    if isinstance(model, VisionTransformer):
        state = checkpoint_filter_fn(state, model)
    # Classifier or projection heads are never used for features; the model is built without one.
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def load_weights(model: nn.Module, state: dict[str, Tensor], what: str) -> None:
    """Strict load; every missing, unexpected or mis-shaped tensor is named in one EncoderError."""
    state = _fit_state_dict(state, model)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:

        def listing(label: str, items: list[str]) -> str:
            return f"\n  {label} ({len(items)}): " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else "")

        raise EncoderError(
            f"encoder weights do not fit {what}:"
            + (listing("missing", missing) if missing else "")
            + (listing("unexpected", unexpected) if unexpected else "")
            + (listing("wrong shape", shapes) if shapes else "")
            + "\ncheck that encoder.name names the architecture of the checkpoint in encoder.weights"
        )
    model.load_state_dict(state, strict=True, assign=True)


def spec_from_metadata(metadata: dict[str, str], uri: str) -> EncoderSpec:
    if METADATA_KEY not in metadata:
        raise EncoderError(
            f"{uri} has no {METADATA_KEY!r} metadata: encoder.name={CUSTOM} needs a file written by "
            "erw.models.encoders.save_encoder_file (or pick a registered encoder.name)"
        )
    info = json.loads(metadata[METADATA_KEY])
    return dataclasses.replace(
        ENCODERS[CUSTOM],
        timm_name=info["timm_name"],
        timm_kwargs=info["kwargs"],
        dim=info["dim"],
        patch_size=info["patch_size"],
        prefix_tokens=info["prefix_tokens"],
        mean=tuple(info["mean"]),
        std=tuple(info["std"]),
        image_stride=info["image_stride"],
    )


def save_encoder_file(
    model: nn.Module,
    timm_name: str,
    kwargs: dict[str, Any],
    uri: str,
    *,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    image_stride: int | None = None,
) -> None:
    """Write a timm ViT (built as timm.create_model(timm_name, **kwargs)) for encoder.name=timm-file.

    image_stride: training-image pixels per token side; default = the patch size, i.e. the encoder
    reads training images at their own resolution."""
    from safetensors.torch import save

    patch = model.patch_embed.patch_size[0]
    info = {
        "timm_name": timm_name,
        "kwargs": {k: v for k, v in kwargs.items() if k != "img_size"},
        "dim": model.embed_dim,
        "patch_size": patch,
        "prefix_tokens": model.num_prefix_tokens,
        "mean": list(mean),
        "std": list(std),
        "image_stride": image_stride or patch,
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    storage.write_bytes(uri, save(tensors, metadata={METADATA_KEY: json.dumps(info)}))


def load_encoder(cfg: EncoderConfig, resolution: int, device: torch.device | str = "cpu") -> FrozenEncoder:
    """The frozen encoder named by cfg, reading images of `resolution` pixels, on `device`."""
    spec = ENCODERS.get(cfg.name)
    if spec is None:
        raise EncoderError(f"encoder.name={cfg.name!r} is not a known encoder; known: {', '.join(sorted(ENCODERS))}")
    state: dict[str, Tensor] | None = None
    if cfg.weights not in ("", "random"):
        state, metadata = read_weights(cfg.weights)
        if spec.family == "custom":
            spec = spec_from_metadata(metadata, cfg.weights)
    elif spec.family == "custom":
        raise EncoderError(f"encoder.name={CUSTOM} reads its architecture from encoder.weights: set it to the file")
    spec.grid(resolution)  # a resolution the encoder cannot tile fails here, before any building
    if cfg.dim is not None and cfg.dim != spec.dim:
        raise EncoderError(f"encoder.dim={cfg.dim} but {spec.name} gives {spec.dim}-dimensional tokens")

    if cfg.weights == "random":
        logging.warning(
            "encoder %s has RANDOM weights (encoder.weights=random): aligning to a random encoder is "
            "meaningless; use it only for tests and demos",
            spec.name,
        )
        with torch.random.fork_rng(devices=[]):  # the same random encoder on every rank and run
            torch.manual_seed(0)
            model = build_encoder_model(spec, resolution)
    elif state is None:
        if not spec.hub:
            raise EncoderError(f"timm's hub has no weights for {spec.name}: download them and set encoder.weights")
        try:
            model = build_encoder_model(spec, resolution, pretrained=True)
        except OSError as err:
            raise EncoderError(
                f"could not download {spec.timm_name} from timm's hub ({str(err).splitlines()[0]}); without a "
                "network, copy the weights to a file or s3:// URI and set encoder.weights to it"
            ) from None
    else:
        with torch.device("meta"):  # no random init: every tensor comes from the file
            model = build_encoder_model(spec, resolution)
        load_weights(model, state, f"{spec.name} (timm {spec.timm_name})")
        model = model.float()

    if model.embed_dim != spec.dim or model.num_prefix_tokens != spec.prefix_tokens:
        raise EncoderError(f"timm's {spec.timm_name} does not match the registry entry {spec.name}")
    return FrozenEncoder(spec, model, resolution).to(device)
