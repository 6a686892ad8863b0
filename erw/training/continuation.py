"""Continue mode: phase 2 starts from a published phase-2 checkpoint (`erw train --init-from
CKPT` where CKPT was written by `erw train`) instead of a warmup, for train.steps more steps on
the current data. The warmup is skipped: the published model already holds what it gave.

What is taken from the checkpoint:
- the model and EMA weights, all of them (the architecture must be the same);
- the AdamW moments (per-parameter state), restored: the published model sits at the end of a
  long run whose gradient statistics the moments track; a fresh AdamW would start with
  bias-corrected first steps of size lr * sign(g) on every weight, a jolt that a converged
  model and its EMA would take hundreds of steps to absorb. The hyper-parameters (lr, betas,
  weight decay) are this run's, from the config, not the checkpoint's;
- its warmup length W (the ERW objective's schedule depends on it).
Alignment projectors (REPA's MLPs from a hidden state to the encoder's tokens) only serve the
alignment loss; the denoiser never reads them. So a checkpoint with projectors continues into a run
without alignment (`encoder.name=none`, or an alignment weight of 0): they are left out, with their
AdamW moments, and the log says so; the generated images are the same. The reverse, a checkpoint
trained without alignment into a run that aligns, is refused: its projectors would start random
while the alignment weight starts at its full value, a jolt to a converged model that the short
continued run cannot be trusted to absorb (and the objective differs from the published run's).
Such a run is a new training: retrain from scratch, or continue with `encoder.name=none`.
Not taken: the step count (this run counts from 0), the data position and the RNG state (the
data changed), so this is a new run that started from a model, not a resume. Every checkpoint
of the run records `init_from` (the published checkpoint), and `erw promote` copies it into the
registry entry's lineage as `started_from`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from erw.models.sit import sit_from_config
from erw.training import checkpoint as ckpt
from erw.training.handoff import lineage_differences

PROJECTORS = "projectors."  # the SiT's alignment projectors (erw.models.sit)

# Model settings that must agree for the weights to be the same tensors with the same meaning.
MODEL_FIELDS = (
    "arch",
    "depth",
    "hidden_size",
    "num_heads",
    "mlp_ratio",
    "qk_norm",
    "rope",
    "num_classes",
    "projector_dim",
    "align_depth",
    "l2r_depth",
)


class ContinuationError(ckpt.CheckpointError):
    """The published checkpoint cannot be continued by this run; the message lists why."""


def is_phase2_checkpoint(uri: str) -> bool:
    """True when uri (a checkpoint or a run directory) holds a checkpoint written by `erw train`."""
    import json

    from erw import storage

    meta = json.loads(storage.read_bytes(storage.join(ckpt.resolve_checkpoint(uri), ckpt.META)))
    return meta.get("phase") == "train"


def continue_from(state: Any, cfg: Any, uri: str, now: dict[str, Any], log: Callable[[str], None]) -> str:
    """Load the published checkpoint at uri into state (a fresh TrainState); returns its URI."""
    start = ckpt.load_checkpoint(uri, with_train_state=True)
    start_cfg = start.config()
    aligned_then = any(name.startswith(PROJECTORS) for name in start.model_state)
    aligns_now = any(name.startswith(PROJECTORS) for name in state.model.state_dict())
    if aligns_now and not aligned_then:
        raise ContinuationError(
            f"cannot continue from {start.uri}: it was trained without representation alignment (no projectors; "
            f"its encoder: {(start.meta.get('lineage') or {}).get('encoder', {}).get('name', start_cfg.encoder.name)}), "
            f"and this run aligns to encoder.name={cfg.encoder.name}. Its projectors would start random under the "
            "full alignment weight, a jolt to the published model. Continue it with encoder.name=none, or train "
            "an aligned model from scratch"
        )
    differ = [
        f"model.{name}: {getattr(start_cfg.model, name)!r} in the checkpoint, {getattr(cfg.model, name)!r} now"
        for name in MODEL_FIELDS
        if getattr(start_cfg.model, name) != getattr(cfg.model, name)
    ]
    differ += [
        d.replace("warmup", "checkpoint") for d in lineage_differences(now, start.meta.get("lineage"), start_cfg)
    ]
    if differ:
        raise ContinuationError(
            f"cannot continue from {start.uri}: it does not fit this run:\n  - "
            + "\n  - ".join(differ)
            + "\nContinue with the published model's settings, or retrain from scratch"
        )
    moments = start.train_state["optimizer"]["state"]
    if aligned_then and not aligns_now:
        dropped = [name for name in start.model_state if name.startswith(PROJECTORS)]
        moments = _moments_by_name(moments, _checkpoint_model(start, cfg), state.model)
        for weights in (start.model_state, start.ema_state):
            for name in dropped:
                del weights[name]
        log(
            f"continue from {start.uri}: its {len(dropped)} alignment projector tensors are left out (this run does "
            f"not align: encoder.name={cfg.encoder.name}); the denoiser, which never reads them, is unchanged"
        )
    state.model.load_state_dict(start.model_state)
    state.ema.load_state_dict(start.ema_state)
    optimizer = state.optimizer.state_dict()  # this run's hyper-parameters, the checkpoint's moments
    optimizer["state"] = moments
    state.optimizer.load_state_dict(optimizer)
    state.warmup_steps = int(start.meta.get("warmup_steps", 0))
    log(
        f"continue from {start.uri} (phase 2 step {start.step}, warmup W={state.warmup_steps}): model, EMA and "
        f"AdamW moments restored; step, data position and learning rate are this run's"
    )
    return start.uri


def _trainable_names(model: torch.nn.Module) -> list[str]:
    """Parameter names in the order of the optimizer's indices (TrainState: AdamW over these)."""
    return [name for name, q in model.named_parameters() if q.requires_grad]


def _checkpoint_model(start: ckpt.Checkpoint, cfg: Any) -> torch.nn.Module:
    """The checkpoint's model, on the meta device (shapes and names only, no memory): its
    projector's output width is the encoder's token width."""
    last = max(
        (n for n in start.model_state if n.startswith(f"{PROJECTORS}0.") and n.endswith(".weight")),
        key=lambda n: int(n.split(".")[2]),
    )  # projectors.0.<layer>.weight: its last Linear
    encoder_dim = start.model_state[last].shape[0]
    with torch.device("meta"):
        return sit_from_config(start.config().model, cfg.data.latent_size, cfg.data.latent_channels, encoder_dim)


def _moments_by_name(moments: dict[int, Any], then: torch.nn.Module, now: torch.nn.Module) -> dict[int, Any]:
    """The AdamW per-parameter state indexed by `then`'s parameters, re-indexed for `now`'s
    (the parameters now lacks, the projectors, are left out)."""
    index_then = {name: i for i, name in enumerate(_trainable_names(then))}
    return {
        i: moments[index_then[name]] for i, name in enumerate(_trainable_names(now)) if index_then.get(name) in moments
    }
