"""`erw data digits`: a real, tiny, offline dataset for the demo.

scikit-learn ships the UCI handwritten digits (1,797 images of 8x8 pixels, 16 grey levels,
10 classes) inside the package, so no download is needed.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from erw import storage

SIZE = 32


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB images [1797, 32, 32, 3] (dark ink on white) and int labels [1797]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    ink = digits.images / 16.0  # 0 = background, 1 = full ink
    grey = np.round(255 * (1 - ink)).astype(np.uint8)
    images = np.stack(
        [np.asarray(Image.fromarray(g).resize((SIZE, SIZE), resample=Image.BICUBIC).convert("RGB")) for g in grey]
    )
    return images, digits.target.astype(np.int64)


def write_digits(out: str) -> int:
    """Write out/<digit>/<index>.png for every image; returns the number written."""
    images, labels = digit_images()
    for index, (image, label) in enumerate(zip(images, labels)):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        storage.write_bytes(storage.join(out, str(label), f"{index:04d}.png"), buffer.getvalue())
    return len(images)
