"""Small image datasets that tests write themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def noise_image_folder(root: Path, count: int, classes: int, size: int, seed: int = 0) -> Path:
    """An ImageFolder of `count` uniform-noise size x size PNGs: image i is `c{i % classes}/{i}.png`."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        path = root / f"c{i % classes}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return root
