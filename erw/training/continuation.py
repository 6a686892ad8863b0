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
Not taken: the step count (this run counts from 0), the data position and the RNG state (the
data changed), so this is a new run that started from a model, not a resume. Every checkpoint
of the run records `init_from` (the published checkpoint), and `erw promote` copies it into the
registry entry's lineage as `started_from`.
"""
from __future__ import annotations

from typing import Any, Callable

from erw.training import checkpoint as ckpt
from erw.training.handoff import lineage_differences

# Model settings that must agree for the weights to be the same tensors with the same meaning.
MODEL_FIELDS = ("arch", "depth", "hidden_size", "num_heads", "mlp_ratio", "qk_norm", "rope", "num_classes",
                "projector_dim", "align_depth", "l2r_depth")


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
    differ = [
        f"model.{name}: {getattr(start_cfg.model, name)!r} in the checkpoint, {getattr(cfg.model, name)!r} now"
        for name in MODEL_FIELDS if getattr(start_cfg.model, name) != getattr(cfg.model, name)
    ]
    differ += [d.replace("warmup", "checkpoint") for d in lineage_differences(now, start.meta.get("lineage"), start_cfg)]
    if differ:
        raise ContinuationError(
            f"cannot continue from {start.uri}: it does not fit this run:\n  - " + "\n  - ".join(differ)
            + "\nContinue with the published model's settings, or retrain from scratch"
        )
    state.model.load_state_dict(start.model_state)
    state.ema.load_state_dict(start.ema_state)
    optimizer = state.optimizer.state_dict()  # this run's hyper-parameters, the checkpoint's moments
    optimizer["state"] = start.train_state["optimizer"]["state"]
    state.optimizer.load_state_dict(optimizer)
    state.warmup_steps = int(start.meta.get("warmup_steps", 0))
    log(f"continue from {start.uri} (phase 2 step {start.step}, warmup W={state.warmup_steps}): model, EMA and "
        f"AdamW moments restored; step, data position and learning rate are this run's")
    return start.uri
