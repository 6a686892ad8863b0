"""Feature networks and feature extraction.

A feature network maps uint8 images [N, 3, H, W] to {"pool": [N, D]} plus, when it has them,
"logits" [N, K] (Inception Score) and "spatial" [N, D_s] (sFID). The default is the TF-compatible
Inception (inception.py). For small datasets whose images Inception was never meant for (the
digits demo, 32px latents), any network trained on the data can stand in: save it once with
`save_feature_network` and pass its URI; metrics are then only comparable between runs that
use the same network.

Custom networks are stored as torch.export programs (.pt2): graph and weights, loaded without
unpickling Python objects and without the code that defined them.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Iterable, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from erw import storage
from erw.evaluation.inception import FeatureNetworkError, load_inception


class FeatureNetwork(Protocol):
    name: str
    identity: str  # name plus a weights fingerprint: statistics are only comparable within one
    has_logits: bool
    has_spatial: bool
    # Its logits index the dataset's own class ids (a classifier trained on them, as `erw
    # fit-evaluator` makes), so "classified as the class asked for" is defined. Not Inception's.
    classifies_labels: bool

    def __call__(self, images: Tensor) -> dict[str, Tensor]: ...


class ExportedFeatureNetwork(nn.Module):
    """A torch.export program returning features [N, D] or a (features, logits) pair."""

    has_spatial = False

    def __init__(self, program: torch.export.ExportedProgram, fingerprint: str, has_logits: bool):
        super().__init__()
        self.module = program.module()
        self.name = "custom"
        self.identity = f"custom:{fingerprint[:16]}"
        self.has_logits = has_logits
        self.classifies_labels = has_logits

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        out = self.module(images)
        if isinstance(out, (tuple, list)):
            return {"pool": out[0].float(), "logits": out[1].float()}
        return {"pool": out.float()}


def save_feature_network(module: nn.Module, uri: str, resolution: int) -> None:
    """Export `module` (uint8 images [N, 3, R, R] -> features, or (features, logits)) for any batch size."""
    example = torch.zeros(2, 3, resolution, resolution, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(module.eval(), (example,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    storage.write_bytes(uri, buffer.getvalue())


def load_feature_network(uri: str, device: str | torch.device = "cpu") -> ExportedFeatureNetwork:
    try:
        data = storage.read_bytes(uri)
    except (storage.StorageError, OSError) as err:
        raise FeatureNetworkError(f"cannot read the feature network {uri}: {err}") from None
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as err:  # broad on purpose (zip, serialisation and version errors)
        raise FeatureNetworkError(
            f"{uri} is not a torch.export program (.pt2): {err}. Save the network with "
            "erw.evaluation.features.save_feature_network(module, uri, resolution)"
        ) from None
    outputs = program.call_spec.out_spec.num_leaves if program.call_spec.out_spec else 1
    if outputs not in (1, 2):
        raise FeatureNetworkError(
            f"the feature network {uri} returns {outputs} tensors: expected features or (features, logits)"
        )
    return ExportedFeatureNetwork(program, hashlib.sha256(data).hexdigest(), has_logits=outputs == 2).to(device)


def load_network(
    inception_weights: str = "", feature_network: str = "", device: str | torch.device = "cpu"
) -> FeatureNetwork:
    """The custom feature network when one is given, else the Inception."""
    if feature_network:
        return load_feature_network(feature_network, device)
    return load_inception(inception_weights, device)


@dataclass
class Features:
    """Features of a set of images, in the order they were read."""

    pool: np.ndarray  # [N, D] float32
    logits: np.ndarray | None  # [N, K]
    spatial: np.ndarray | None  # [N, D_s]

    @property
    def count(self) -> int:
        return self.pool.shape[0]


def extract_features(network: FeatureNetwork, batches: Iterable[Tensor], device: str | torch.device) -> Features:
    """Run the network over uint8 image batches [B, 3, H, W]."""
    parts: dict[str, list[np.ndarray]] = {"pool": [], "logits": [], "spatial": []}
    for images in batches:
        out = network(images.to(device, non_blocking=True))
        for key, value in out.items():
            parts[key].append(value.float().cpu().numpy())
    if not parts["pool"]:
        raise FeatureNetworkError("no images to compute features of")
    joined = {k: np.concatenate(v) if v else None for k, v in parts.items()}
    return Features(pool=joined["pool"], logits=joined["logits"], spatial=joined["spatial"])
