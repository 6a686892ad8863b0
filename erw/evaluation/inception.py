"""Inception-v3 features of the TF FID network, as the ADM evaluator reads them.

torch-fidelity's FeatureExtractorInceptionV3 is a port of the 2015-12-05 TensorFlow graph that
FID, the ADM evaluator and the published ImageNet numbers use (TF1 bilinear resize to 299,
TF padding quirks). From one forward pass we take

    pool     pool_3, 2048-d: FID, precision/recall
    logits   the 1008-way logits without bias (ADM's softmax input): Inception Score
    spatial  mixed_6/conv, first 7 channels of the 17x17 map, flattened in TF's (h, w, c)
             order to 2023-d: sFID. In PyTorch naming that is Mixed_6d.branch1x1 (the TF blocks
             mixed, mixed_1 .. mixed_10 are Mixed_5b .. Mixed_7c), read through a forward hook
             because torch-fidelity does not expose it.

Weights come from a local file or s3:// URI (a state dict in .pth or .safetensors form), or,
when none is given, torch-fidelity's release URL through the torch hub cache.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from erw import storage
from erw.errors import ErwError

WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17
_FIDELITY_NAME = "inception-v3-compat"


class FeatureNetworkError(ErwError):
    """A feature network (Inception or custom) that cannot be loaded or used."""


class InceptionFeatures(nn.Module):
    """uint8 images [N, 3, H, W] (any size) -> {"pool", "logits", "spatial"} float32 features."""

    name = "inception-v3-tf"
    has_logits = has_spatial = True
    classifies_labels = False  # ImageNet's 1008 Inception classes, not the dataset's ids
    pool_dim = POOL_DIM

    def __init__(self, state_dict: dict[str, Tensor], fingerprint: str):
        super().__init__()
        self.net = _build_extractor(state_dict)
        self.identity = f"{self.name}:{fingerprint[:16]}"  # names caches: other weights, other stats
        self._spatial: Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        self._spatial = output[:, :SPATIAL_CHANNELS]

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        pool, logits = self.net(images)
        spatial = self._spatial.permute(0, 2, 3, 1).flatten(1).float()  # TF's NHWC flattening order
        self._spatial = None
        return {"pool": pool, "logits": logits, "spatial": spatial}


def _build_extractor(state_dict: dict[str, Tensor]) -> nn.Module:
    """torch-fidelity's extractor with our (already checked) weights.

    Its constructor only loads weights from a file, with a full unpickler; we hand it a private
    file holding the plain tensors we loaded safely, never the user's file itself.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "inception.pth")
        torch.save(state_dict, path)
        try:
            return FeatureExtractorInceptionV3(
                _FIDELITY_NAME, ["2048", "logits_unbiased"], feature_extractor_weights_path=path
            )
        except RuntimeError as err:  # load_state_dict: missing, unexpected or misshaped tensors
            raise FeatureNetworkError(
                f"the Inception weights do not fit torch-fidelity's InceptionV3 (the TF FID network): {err}"
            ) from None


def read_state_dict(uri: str) -> tuple[dict[str, Tensor], str]:
    """A state dict from a .safetensors or torch .pth file (local or s3://) and the sha256 of its bytes.

    .pth files are read with weights_only=True: nothing but tensors and containers is unpickled.
    """
    try:
        data = storage.read_bytes(uri)
    except (storage.StorageError, OSError) as err:
        raise FeatureNetworkError(f"cannot read weights {uri}: {err}") from None
    digest = hashlib.sha256(data).hexdigest()
    try:
        if uri.endswith(".safetensors"):
            from safetensors.torch import load

            return load(data), digest
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # broad on purpose (pickle, zip and safetensors raise many types)
        raise FeatureNetworkError(f"{uri} is not a state dict in .pth or .safetensors form: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise FeatureNetworkError(f"{uri} holds a {type(state).__name__}, not a state dict of tensors")
    return state, digest


def _hub_weights() -> str:
    """torch-fidelity's release file in the torch hub cache, downloaded on first use."""
    from torch.hub import download_url_to_file, get_dir

    path = Path(get_dir()) / "checkpoints" / WEIGHTS_URL.rsplit("/", 1)[1]
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            download_url_to_file(WEIGHTS_URL, str(path), progress=False)
        except OSError as err:
            raise FeatureNetworkError(
                f"cannot download the Inception weights ({err}). Without a network, copy {WEIGHTS_URL} "
                "to a local path or s3:// and pass --inception-weights URI"
            ) from None
    return str(path)


def load_inception(weights: str = "", device: str | torch.device = "cpu") -> InceptionFeatures:
    """The TF-compatible Inception from a weights URI ('' = torch-fidelity's release file)."""
    state, digest = read_state_dict(weights or _hub_weights())
    return InceptionFeatures(state, digest).to(device).eval()
