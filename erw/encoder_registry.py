"""The known alignment encoders as data: names, timm architectures, token widths, preprocessing.

Pure data (no torch), so the config can check `encoder.name` and `encoder.dim` without importing
the models; `erw.models.encoders` builds and loads the networks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from erw.errors import ErwError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
CUSTOM = "timm-file"


class EncoderError(ErwError):
    """An encoder that cannot be built or loaded; the message says how to fix it."""


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    timm_name: str  # timm architecture, ".tag" = the hub weights it loads when encoder.weights is empty
    dim: int | None  # token width (None only for the custom placeholder: read from the file)
    patch_size: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    prefix_tokens: int  # class + register tokens dropped from the output
    family: str
    image_stride: int = 16  # pixels of the training image per token side
    hub: bool = True  # timm's hub has weights for timm_name
    timm_kwargs: dict[str, Any] = field(default_factory=dict)

    def grid(self, resolution: int) -> int:
        """Token grid side for training images of `resolution` pixels."""
        if resolution <= 0 or resolution % self.image_stride:
            raise EncoderError(
                f"encoder {self.name} reads one token per {self.image_stride}x{self.image_stride} pixels: "
                f"data.resolution={resolution} must be a positive multiple of {self.image_stride}"
            )
        return resolution // self.image_stride

    def input_resolution(self, resolution: int) -> int:
        """Side of the image the encoder sees: 224 * res / 256 for patch 14, res for patch 16."""
        return self.grid(resolution) * self.patch_size

    def num_tokens(self, resolution: int) -> int:
        return self.grid(resolution) ** 2


def _registry() -> dict[str, EncoderSpec]:
    specs = []
    for size, width, dim in [("s", "small", 384), ("b", "base", 768), ("l", "large", 1024), ("g", "giant", 1536)]:
        specs += [
            EncoderSpec(
                f"dinov2-vit-{size}",
                f"vit_{width}_patch14_dinov2.lvd142m",
                dim,
                14,
                IMAGENET_MEAN,
                IMAGENET_STD,
                1,
                "dinov2",
            ),
            EncoderSpec(
                f"dinov2reg-vit-{size}",
                f"vit_{width}_patch14_reg4_dinov2.lvd142m",
                dim,
                14,
                IMAGENET_MEAN,
                IMAGENET_STD,
                5,
                "dinov2",
            ),
        ]
    specs += [
        EncoderSpec("dinov1-vit-b", "vit_base_patch16_224.dino", 768, 16, IMAGENET_MEAN, IMAGENET_STD, 1, "dinov1"),
        EncoderSpec("clip-vit-l", "vit_large_patch14_clip_224.openai", 1024, 14, CLIP_MEAN, CLIP_STD, 1, "clip"),
        EncoderSpec("mae-vit-l", "vit_large_patch16_224.mae", 1024, 16, IMAGENET_MEAN, IMAGENET_STD, 1, "mae"),
        EncoderSpec(
            "jepa-vit-h", "vit_huge_patch14_gap_224.in1k_ijepa", 1280, 14, IMAGENET_MEAN, IMAGENET_STD, 0, "jepa"
        ),
        # timm builds the MoCo v3 architecture but hosts no MoCo v3 weights: pass the official
        # checkpoint (vit-b-300ep.pth.tar / vit-l-300ep.pth.tar) as encoder.weights.
        EncoderSpec(
            "mocov3-vit-b", "vit_base_patch16_224", 768, 16, IMAGENET_MEAN, IMAGENET_STD, 1, "mocov3", hub=False
        ),
        EncoderSpec(
            "mocov3-vit-l", "vit_large_patch16_224", 1024, 16, IMAGENET_MEAN, IMAGENET_STD, 1, "mocov3", hub=False
        ),
        EncoderSpec(CUSTOM, "", None, None, IMAGENET_MEAN, IMAGENET_STD, 0, "custom", hub=False),
    ]
    return {spec.name: spec for spec in specs}


ENCODERS: dict[str, EncoderSpec] = _registry()
