"""Sample grids: one row per class, filled while the evaluation streams over the samples."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor

PAD = 2  # pixels of white between images


class GridCollector:
    """Keeps the first `per_class` images of the first `rows` classes it sees (by class id)."""

    def __init__(self, rows: int = 8, per_class: int = 8):
        self.rows, self.per_class = rows, per_class
        self.images: dict[int, list[np.ndarray]] = {}

    def add(self, images: Tensor, labels: Tensor) -> None:
        for image, label in zip(images, labels.tolist()):
            kept = self.images.setdefault(label, [])
            if len(kept) < self.per_class:
                kept.append(image.permute(1, 2, 0).cpu().numpy())
        for label in sorted(self.images)[self.rows :]:  # bounded memory with thousands of classes
            del self.images[label]

    def classes(self) -> list[int]:
        """The rows of the grid: the lowest class ids seen (all samples in one row when unlabelled)."""
        return sorted(self.images)[: self.rows]

    def png(self) -> bytes:
        rows = [self.images[c] for c in self.classes()]
        if not rows:
            raise ValueError("no images collected for the grid")
        height, width = rows[0][0].shape[:2]
        canvas = np.full(
            (len(rows) * (height + PAD) + PAD, self.per_class * (width + PAD) + PAD, 3), 255, dtype=np.uint8
        )
        for r, row in enumerate(rows):
            for c, image in enumerate(row):
                top, left = PAD + r * (height + PAD), PAD + c * (width + PAD)
                canvas[top : top + height, left : left + width] = image
        buffer = io.BytesIO()
        Image.fromarray(canvas).save(buffer, format="PNG")
        return buffer.getvalue()


def grid_png(images: Tensor, labels: Tensor | None = None, rows: int = 8, per_class: int = 8) -> bytes:
    """A grid of uint8 images [N, 3, H, W], one row per class."""
    collector = GridCollector(rows, per_class)
    collector.add(images, labels if labels is not None else torch.full((len(images),), -1))
    return collector.png()
