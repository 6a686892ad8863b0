"""Small networks for small datasets (the digits demo): an encoder to align to, and an evaluator.

encoder    a tiny timm ViT whose patch tokens are the alignment target. Trained supervised: a
           linear classifier reads the mean of its patch tokens, so every token learns features
           that separate the classes. Saved with `save_encoder_file`, it loads through the
           encoder registry as encoder.name=timm-file encoder.weights=FILE.
evaluator  a small CNN (`erw.evaluation.small_evaluator`): another architecture, another seed and
           another train/validation split, never used for alignment. Its penultimate features give
           a Fréchet distance, its logits the class accuracy of generated samples. Saved as a
           torch.export program, it loads as `erw evaluate --feature-network FILE`.

Both train with `fit_classifier` below, on uint8 images [N, 3, R, R] held in memory, with random translations of up to
`max_shift` pixels, and report accuracy on a held-out split.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from erw.errors import ErwError

ENCODER_TIMM_NAME = "vit_tiny_patch16_224"  # timm's ViT, re-sized through its kwargs
ENCODER_MEAN = ENCODER_STD = (0.5, 0.5, 0.5)  # pixels to [-1, 1]


class SmallNetError(ErwError):
    """Training data or settings the small networks cannot use."""


@dataclass(frozen=True)
class FitSettings:
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0  # initial weights, split, batch order and augmentation
    val_fraction: float = 0.2
    max_shift: int = 2  # random translation in pixels, both axes

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise SmallNetError(
                f"steps, batch size and learning rate must be positive, got {self.steps}, {self.batch_size}, {self.lr}"
            )
        if not 0 <= self.val_fraction < 1 or self.max_shift < 0:
            raise SmallNetError(
                f"val_fraction={self.val_fraction} must be in [0, 1) and max_shift={self.max_shift} >= 0"
            )


@dataclass(frozen=True)
class FitReport:
    train_accuracy: float
    val_accuracy: float
    num_train: int
    num_val: int
    steps: int
    seconds: float

    def describe(self) -> str:
        return (
            f"accuracy {100 * self.train_accuracy:.1f}% train ({self.num_train} images), "
            f"{100 * self.val_accuracy:.1f}% held out ({self.num_val}); {self.steps} steps in {self.seconds:.0f}s"
        )


# ---------------------------------------------------------------------------------------------
# The encoder.


def encoder_kwargs(
    resolution: int, patch_size: int = 4, dim: int = 64, depth: int = 4, heads: int = 4
) -> dict[str, Any]:
    """timm.create_model kwargs of the digits encoder: one token per patch_size pixels."""
    if resolution % patch_size:
        raise SmallNetError(f"image resolution {resolution} is not a multiple of the encoder patch size {patch_size}")
    if dim % heads:
        raise SmallNetError(f"encoder width {dim} is not divisible by its {heads} heads")
    return dict(img_size=resolution, patch_size=patch_size, embed_dim=dim, depth=depth, num_heads=heads)


def build_encoder(kwargs: dict[str, Any]) -> nn.Module:
    import timm

    return timm.create_model(ENCODER_TIMM_NAME, pretrained=False, num_classes=0, **kwargs)


class TokenClassifier(nn.Module):
    """The supervision of the encoder: a linear classifier on the mean of its patch tokens."""

    def __init__(self, vit: nn.Module, num_classes: int):
        super().__init__()
        self.vit = vit
        self.head = nn.Linear(vit.embed_dim, num_classes)
        mean, std = torch.tensor(ENCODER_MEAN), torch.tensor(ENCODER_STD)
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        # The normalisation FrozenEncoder applies, so the saved tokens are the ones trained.
        x = (images.float() / 255 - self.mean) / self.std
        tokens = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens :]
        return self.head(tokens.mean(dim=1))


def fit_encoder(
    images: Tensor, labels: Tensor, settings: FitSettings, kwargs: dict[str, Any], log: Callable[[str], None] = print
) -> tuple[nn.Module, FitReport]:
    """Train the digits ViT; returns the backbone (no head) and its accuracy report."""
    torch.manual_seed(settings.seed)
    classifier = TokenClassifier(build_encoder(kwargs), num_classes(labels))
    report = fit_classifier(classifier, images, labels, settings, log)
    return classifier.vit.eval(), report


def save_encoder(vit: nn.Module, kwargs: dict[str, Any], uri: str) -> None:
    """Write the encoder for encoder.name=timm-file encoder.weights=uri."""
    from erw.models.encoders import save_encoder_file

    save_encoder_file(vit, ENCODER_TIMM_NAME, kwargs, uri, mean=ENCODER_MEAN, std=ENCODER_STD)


# ---------------------------------------------------------------------------------------------
# Shared training loop of both classifiers.


def num_classes(labels: Tensor) -> int:
    return int(labels.max()) + 1


def check_images(images: Tensor, labels: Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise SmallNetError(f"expected uint8 images [N, 3, R, R], got {images.dtype} {tuple(images.shape)}")
    if labels.shape != (images.shape[0],) or labels.min() < 0:
        raise SmallNetError(f"expected one non-negative class label per image, got labels {tuple(labels.shape)}")
    counts = torch.bincount(labels)
    if len(counts) < 2 or (counts == 0).any() or images.shape[0] < 20:
        raise SmallNetError(
            f"{images.shape[0]} images in {int((counts > 0).sum())} classes: the small networks need at least "
            "20 images and two classes, each with images (ImageFolder: one sub-folder per class)"
        )


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """A random (train, validation) split of range(n), fixed by seed."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    num_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    return order[num_val:], order[:num_val]


def random_shift(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by whole pixels in [-max_shift, max_shift], repeating the border."""
    if max_shift == 0:
        return images.float()
    n, _, h, w = images.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator).float()
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 2 * shifts[:, 0] / w  # grid units: the image spans [-1, 1]
    theta[:, 1, 2] = 2 * shifts[:, 1] / h
    grid = F.affine_grid(theta, (n, 3, h, w), align_corners=False)
    return F.grid_sample(images.float(), grid, mode="nearest", padding_mode="border", align_corners=False)


@torch.no_grad()
def accuracy(classify: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    if len(images) == 0:
        return math.nan
    correct = sum(
        int((classify(images[i : i + batch_size]).argmax(dim=1) == labels[i : i + batch_size]).sum())
        for i in range(0, len(images), batch_size)
    )
    return correct / len(images)


def fit_classifier(
    classify: nn.Module, images: Tensor, labels: Tensor, settings: FitSettings, log: Callable[[str], None] = print
) -> FitReport:
    """AdamW with cosine decay on cross-entropy; images uint8 [N, 3, R, R] -> logits."""
    check_images(images, labels)
    started = time.perf_counter()
    train, val = split_indices(len(images), settings.val_fraction, settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(classify.parameters(), lr=settings.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.steps)
    classify.train()
    for step in range(1, settings.steps + 1):
        batch = train[torch.randint(len(train), (settings.batch_size,), generator=generator)]
        loss = F.cross_entropy(classify(random_shift(images[batch], settings.max_shift, generator)), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % max(1, settings.steps // 5) == 0:
            log(f"step {step}/{settings.steps} loss {loss.item():.4f}")
    classify.eval()
    return FitReport(
        train_accuracy=accuracy(classify, images[train], labels[train]),
        val_accuracy=accuracy(classify, images[val], labels[val]),
        num_train=len(train),
        num_val=len(val),
        steps=settings.steps,
        seconds=time.perf_counter() - started,
    )
