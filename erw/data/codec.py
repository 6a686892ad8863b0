"""Latent codecs: images <-> the latents the diffusion model is trained on.

`encode` returns the posterior *moments* (mean and std, fp16, [N, 2C, h, w]) so that the
loader can draw a fresh latent every step (mean + std * noise) instead of freezing one
sample at precompute time. `normalize` maps a latent into model space and `decode` maps
model-space latents back to uint8 images. Two codecs:

- a diffusers AutoencoderKL (sd-vae-ft-ema / sd-vae-ft-mse: 4 channels, 8x downsampling,
  model space = latent * 0.18215, or per-channel (latent - mean) / std when the dataset was
  precomputed with precompute.latent_norm=channel);
- `identity`: pixels scaled to [-1, 1], 3 channels, no downsampling, std 0 (sampling is a
  no-op), for tiny datasets and tests.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from erw.errors import ErwError

HUB_IDS = {"sd-vae-ft-ema": "stabilityai/sd-vae-ft-ema", "sd-vae-ft-mse": "stabilityai/sd-vae-ft-mse"}
CODECS = ("identity", *HUB_IDS)  # = the values of erw.config.Codec (a test holds them equal)


class CodecError(ErwError):
    """The codec cannot be built or loaded; the message says why and what to do."""


@dataclass(frozen=True)
class LatentNorm:
    """Model space z = (latent - shift) * scale, per channel."""

    shift: tuple[float, ...]
    scale: tuple[float, ...]

    @classmethod
    def uniform(cls, channels: int, scale: float) -> "LatentNorm":
        return cls((0.0,) * channels, (scale,) * channels)

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> "LatentNorm":
        codec = manifest["codec"]
        if codec.get("normalization", "scale") == "channel":
            stats = manifest["latent_stats"]
            return cls(tuple(stats["mean"]), tuple(1.0 / max(s, 1e-8) for s in stats["std"]))
        return cls.uniform(codec["latent_channels"], codec["scaling_factor"])

    def _view(self, values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1)

    def normalize(self, latent: torch.Tensor) -> torch.Tensor:
        return (latent - self._view(self.shift, latent)) * self._view(self.scale, latent)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z / self._view(self.scale, z) + self._view(self.shift, z)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N,3,H,W] -> float32 in [-1, 1]."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    return images.float() / 127.5 - 1.0


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 (clamped, rounded)."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class LatentCodec(nn.Module):
    def __init__(
        self, name: str, latent_channels: int, downsample: int, scaling_factor: float, norm: LatentNorm | None = None
    ):
        super().__init__()
        self.name, self.latent_channels, self.downsample = name, latent_channels, downsample
        self.scaling_factor = scaling_factor
        self.norm = norm or LatentNorm.uniform(latent_channels, scaling_factor)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N,3,R,R] -> fp16 moments [N, 2C, R/d, R/d] (mean channels, then std)."""
        raise NotImplementedError

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """latent (not normalised) -> float pixels in [-1, 1]."""
        raise NotImplementedError

    def normalize(self, latent: torch.Tensor) -> torch.Tensor:
        return self.norm.normalize(latent)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Model-space latents [N, C, h, w] -> uint8 images [N, 3, h*d, w*d]."""
        return to_uint8(self.decode_latent(self.norm.denormalize(z.float())))

    def describe(self) -> dict[str, Any]:
        """What the manifest records about this codec."""
        return {
            "name": self.name,
            "latent_channels": self.latent_channels,
            "downsample": self.downsample,
            "scaling_factor": self.scaling_factor,
        }


class IdentityCodec(LatentCodec):
    def __init__(self, norm: LatentNorm | None = None):
        super().__init__("identity", 3, 1, 1.0, norm)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        pixels = to_unit_range(images)
        return torch.cat([pixels, torch.zeros_like(pixels)], dim=1).half()

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        return latent


class VAECodec(LatentCodec):
    """A diffusers AutoencoderKL; encoding runs in fp32 (fp16 SD-VAE encoders can overflow)."""

    def __init__(self, name: str, vae: nn.Module, norm: LatentNorm | None = None):
        config = vae.config
        downsample = 2 ** (len(config.block_out_channels) - 1)
        super().__init__(name, int(config.latent_channels), downsample, float(config.scaling_factor), norm)
        self.vae = vae.eval().requires_grad_(False)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(to_unit_range(images)).latent_dist
        return torch.cat([posterior.mean, posterior.std], dim=1).half()

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent).sample


def load_codec(spec: Any, device: str | torch.device = "cpu", manifest: Mapping[str, Any] | None = None) -> LatentCodec:
    """A codec from a shard manifest (a dict), or from a DataConfig and the manifest of its shards.

    The normalisation comes from the manifest when there is one (so decoding matches what the
    model was trained on), else from the codec's scaling factor. Weights: `codec_weights` (a
    diffusers AutoencoderKL directory, local or s3://), else the manifest's, else the Hugging Face hub.
    """
    if isinstance(spec, Mapping):
        manifest, name, weights = spec, spec["codec"]["name"], ""
    else:
        name, weights = spec.codec, spec.codec_weights
    if manifest is not None:
        weights = weights or manifest["codec"].get("weights", "")
    norm = LatentNorm.from_manifest(manifest) if manifest is not None else None
    return build_codec(name, weights, norm, device)


def build_codec(
    name: str, weights: str = "", norm: LatentNorm | None = None, device: str | torch.device = "cpu"
) -> LatentCodec:
    """A codec by name; norm None = the codec's own scaling factor."""
    if name == "identity":
        return IdentityCodec(norm).to(device)
    if name not in HUB_IDS:
        raise CodecError(f"unknown codec {name!r}: choose one of {', '.join(CODECS)}")
    return VAECodec(name, load_autoencoder(name, weights), norm).to(device)


def load_autoencoder(name: str, weights: str = "") -> nn.Module:
    """AutoencoderKL from a local directory, an s3:// prefix (cached locally) or the hub."""
    from diffusers import AutoencoderKL

    # low_cpu_mem_usage needs `accelerate`; without it diffusers warns and loads this way anyway.
    if weights:
        local = fetch_weights_dir(weights)
        try:
            return AutoencoderKL.from_pretrained(local, low_cpu_mem_usage=False)
        except (OSError, ValueError) as err:
            raise CodecError(
                f"{weights} is not a diffusers AutoencoderKL directory (config.json + "
                f"diffusion_pytorch_model.safetensors): {err}"
            ) from None
    try:
        return AutoencoderKL.from_pretrained(HUB_IDS[name], low_cpu_mem_usage=False)
    except OSError as err:
        raise CodecError(
            f"cannot fetch {HUB_IDS[name]} from the Hugging Face hub ({err.__class__.__name__}). Without a "
            "network, save it once (AutoencoderKL.from_pretrained(...).save_pretrained(DIR)) and pass "
            "data.codec_weights=DIR or s3://bucket/prefix"
        ) from None


def fetch_weights_dir(uri: str) -> str:
    """A local directory holding the files under uri; s3:// prefixes are downloaded once into
    $ERW_CACHE (default ~/.cache/erw) and reused; a marker file makes partial downloads redo."""
    from erw import storage

    if not storage.is_s3(uri):
        if not Path(uri).is_dir():
            raise CodecError(f"codec weights directory {uri} does not exist")
        return uri
    cache = Path(os.environ.get("ERW_CACHE", Path.home() / ".cache" / "erw"))
    local = cache / "weights" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    marker = local / ".complete"
    if not marker.exists():
        storage.download_tree(uri, local)
        marker.write_text(uri)
    return str(local)
