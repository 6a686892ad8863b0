"""Random weights of real architectures, for offline tests (no weight downloads)."""

from __future__ import annotations

import io
from unittest import mock

import torch
from torch_fidelity import feature_extractor_inceptionv3 as fidelity

from erw import storage
from erw.evaluation import inception


def save_random_inception_weights(uri: str, seed: int = 0) -> None:
    """Random weights of the exact architecture, for offline tests and smoke runs of the pipeline.

    He-initialised convolutions keep activations from vanishing through the 90-odd layers, so
    the features still vary with the input. Metrics computed with them are not comparable to
    any published number.
    """
    # Build the module without its weight download, keeping its random initialisation.
    with (
        mock.patch.object(fidelity, "load_state_dict_from_url", return_value={}),
        mock.patch.object(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None),
    ):
        net = fidelity.FeatureExtractorInceptionV3(inception._FIDELITY_NAME, ["2048"])
    generator = torch.Generator().manual_seed(seed)
    state = net.state_dict()
    for name, tensor in state.items():
        if tensor.ndim == 4:  # convolution kernels
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * (2.0 / tensor[0].numel()) ** 0.5)
        elif name == "fc.weight":
            tensor.copy_(torch.randn(tensor.shape, generator=generator) / tensor.shape[1] ** 0.5)
    buffer = io.BytesIO()
    torch.save({k: v.contiguous() for k, v in state.items()}, buffer)
    storage.write_bytes(uri, buffer.getvalue())
