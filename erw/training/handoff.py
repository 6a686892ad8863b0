"""The hand-off from the ERW warmup (phase 1) to phase 2: which warmup phase 2 may start from.

The warmup's weights are only worth loading if phase 2 continues what the warmup learned: the
same model settings (checked tensor by tensor in erw.models.sit.load_warmup, and setting by
setting here for what leaves no trace in the weights, such as RoPE), the same representation
target and the same latent space. Every checkpoint records the last two as its `lineage`:

    encoder   name and the sha256 of its weights (a renamed or moved file is still the same encoder)
    latents   codec, resolution, and the per-channel shift and scale that map latents to model space

A warmup that differs in any of them is refused with the list of differences. One difference may
be allowed on purpose: `train.rope_from_warmup=false` lets phase 2 use 2-D RoPE after a warmup
without it (or the reverse), as the ERW reference's run does; RoPE has no parameters.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch

from erw.config import Config
from erw.data.codec import LatentNorm
from erw.models.sit import HandoffError, load_warmup, warmup_config_differences
from erw.training import checkpoint as ckpt


def encoder_fingerprint(encoder: torch.nn.Module | None) -> str:
    """sha256 over the encoder's tensors (names, shapes, dtypes, bytes); '' without an encoder."""
    if encoder is None:
        return ""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def lineage(cfg: Config, encoder: torch.nn.Module | None, latent_norm: LatentNorm | None) -> dict[str, Any]:
    """What the run aligns to and what latent space it trains in, as stored in each checkpoint."""
    return {
        "encoder": {
            "name": cfg.encoder.name if encoder is not None else "none",
            "weights_sha256": encoder_fingerprint(encoder),
        },
        "latents": {
            "codec": cfg.data.codec,
            "resolution": cfg.data.resolution,
            "shift": list(latent_norm.shift) if latent_norm is not None else None,
            "scale": list(latent_norm.scale) if latent_norm is not None else None,
        },
    }


def lineage_differences(now: dict[str, Any], warm: dict[str, Any] | None, warm_cfg: Config) -> list[str]:
    """How the warmup's lineage differs from this run's. A warmup written before lineages were
    recorded is compared by its config (encoder name and weights location, codec, resolution)."""
    if warm is None:
        warm = {
            "encoder": {"name": warm_cfg.encoder.name, "weights_sha256": ""},
            "latents": {
                "codec": warm_cfg.data.codec,
                "resolution": warm_cfg.data.resolution,
                "shift": None,
                "scale": None,
            },
        }
    out = []
    enc, warm_enc = now["encoder"], warm["encoder"]
    if enc["name"] != "none":  # phase 2 aligns: to the encoder the warmup learned from
        if enc["name"] != warm_enc["name"]:
            out.append(f"encoder: warmup {warm_enc['name']}, now {enc['name']}")
        elif (
            enc["weights_sha256"] and warm_enc["weights_sha256"] and enc["weights_sha256"] != warm_enc["weights_sha256"]
        ):
            out.append(
                f"encoder weights: warmup sha256 {warm_enc['weights_sha256'][:12]}..., now "
                f"{enc['weights_sha256'][:12]}... (another checkpoint of {enc['name']})"
            )
    lat, warm_lat = now["latents"], warm["latents"]
    for key in ("codec", "resolution"):
        if lat[key] != warm_lat[key]:
            out.append(f"data.{key}: warmup {warm_lat[key]!r}, now {lat[key]!r}")
    for key in ("shift", "scale"):
        if lat[key] is not None and warm_lat[key] is not None and lat[key] != warm_lat[key]:
            out.append(f"latent normalisation {key}: warmup {_numbers(warm_lat[key])}, now {_numbers(lat[key])}")
    return out


def _numbers(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


def init_from_warmup(
    model: torch.nn.Module, cfg: Config, uri: str, now: dict[str, Any], log: Callable[[str], None]
) -> tuple[int, list[str]]:
    """Load a warmup checkpoint's embedders and first l2r_depth blocks into model after checking
    that it fits (HandoffError with every difference otherwise); return (its step count W, the
    names of the tensors loaded)."""
    warm = ckpt.load_checkpoint(uri, with_train_state=False)
    if warm.phase != "warmup":
        raise ckpt.CheckpointError(
            f"--init-from {warm.uri} is a {warm.phase!r} checkpoint; expected one from `erw warmup`"
        )
    warm_cfg = warm.config()
    rope_may_differ = not cfg.train.rope_from_warmup
    differ = warmup_config_differences(cfg.model, warm_cfg.model, rope_may_differ=rope_may_differ)
    differ += lineage_differences(now, warm.meta.get("lineage"), warm_cfg)
    if differ:
        raise HandoffError(
            f"the warmup {warm.uri} does not fit this run:\n  - "
            + "\n  - ".join(differ)
            + "\nTrain phase 2 with the warmup's settings, or warm up again with these"
        )
    if warm_cfg.model.rope != cfg.model.rope:
        log(
            f"init-from: RoPE warmup {warm_cfg.model.rope}, now {cfg.model.rope} (allowed: train.rope_from_warmup=false)"
        )
    loaded = load_warmup(model, warm.model_state, cfg.model.l2r_depth)
    log(f"init-from {warm.uri} (warmup step {warm.step}): loaded {len(loaded)} tensors: {', '.join(loaded)}")
    return warm.step, loaded
