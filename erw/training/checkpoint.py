"""Checkpoints: a directory per step, local or on S3, committed by writing meta.json last.

    {out}/step-00001000/
        model.safetensors   trained weights
        ema.safetensors     EMA weights
        state.pt            optimizer, grad scaler, data position (tensors and plain types only)
        meta.json           config, step, phase and the sha256 of every file above: the commit marker

A directory without meta.json is a write that did not finish; it is never loaded and the next
save over it starts clean. Loading verifies every checksum, reads weights with safetensors and
the rest with `torch.load(weights_only=True)`, so nothing arbitrary is ever unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import pickle
import re
import time
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from erw.config import Config, config_from_dict
from erw import faults, storage
from erw.errors import ErwError

FORMAT_VERSION = 1
META = "meta.json"
MODEL, EMA, STATE = "model.safetensors", "ema.safetensors", "state.pt"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(ErwError):
    pass


@dataclass
class Checkpoint:
    uri: str
    meta: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor]
    train_state: dict[str, Any] | None

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def phase(self) -> str:
        return str(self.meta["phase"])

    def config(self) -> Config:
        return config_from_dict(self.meta["config"])


def step_uri(out: str, step: int) -> str:
    return storage.join(out, f"step-{step:08d}")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(
    out: str,
    *,
    step: int,
    phase: str,
    config: Config,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    extra_meta: dict[str, Any] | None = None,
) -> str:
    """Write one checkpoint and commit it; returns its URI. A local write that fails (a full
    disk) removes what it wrote of this step, torn temporary files included, before it raises."""
    uri = step_uri(out, step)
    if storage.exists(uri):  # a leftover of an interrupted write (or a re-save of this step)
        storage.delete_tree(uri)
    state_buf = io.BytesIO()
    torch.save(train_state, state_buf)
    files = {
        MODEL: save_safetensors(_contiguous(model_state)),
        EMA: save_safetensors(_contiguous(ema_state)),
        STATE: state_buf.getvalue(),
    }
    meta = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "phase": phase,
        "created_unix": time.time(),
        "config": config.to_dict(),
        "files": {name: _sha256(data) for name, data in files.items()},
        **(extra_meta or {}),
    }
    files[META] = json.dumps(meta, indent=2).encode()  # the commit marker: written last
    try:
        for name, data in files.items():
            faults.checkpoint_write(storage.join(uri, name), data)
            storage.write_bytes(storage.join(uri, name), data)
    except Exception:
        # Never committed (meta.json comes last). Locally, free the space the partial files take;
        # on S3 (objects appear whole or not at all) a cleanup would wait out the same outage:
        # the next save of this step or the pruning removes them.
        if not storage.is_s3(uri):
            with contextlib.suppress(Exception):
                storage.delete_tree(uri)
        raise
    return uri


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def list_checkpoints(out: str) -> list[tuple[int, str]]:
    """(step, uri) of every committed checkpoint under out, oldest first."""
    found = []
    for name in storage.list_dir(out):
        match = _STEP_DIR.match(name)
        if match and storage.exists(storage.join(out, name, META)):
            found.append((int(match.group(1)), storage.join(out, name)))
    return sorted(found)


def latest_checkpoint(out: str) -> str | None:
    found = list_checkpoints(out)
    return found[-1][1] if found else None


def resolve_checkpoint(uri: str) -> str:
    """A checkpoint directory, or a run's output directory -> its latest committed checkpoint."""
    if storage.exists(storage.join(uri, META)):
        return uri
    if _STEP_DIR.match(uri.rstrip("/").rsplit("/", 1)[-1]) and storage.exists(uri):
        raise CheckpointError(
            f"{uri} is an incomplete checkpoint (no {META}): its write was interrupted. "
            f"Use an earlier checkpoint of the run, e.g. the directory above it to take the latest complete one."
        )
    latest = latest_checkpoint(uri)
    if latest is None:
        raise CheckpointError(f"no complete checkpoint at or under {uri} (expected {META} or step-XXXXXXXX/ folders)")
    return latest


def prune_checkpoints(out: str, keep_last: int, keep: str = "") -> None:
    """Keep the newest keep_last committed checkpoints and `keep` (the one just written: never
    deleted, whatever else the directory holds); delete older ones and older unfinished writes."""
    committed = list_checkpoints(out)
    if not committed:
        return
    kept = {uri for _, uri in committed[-max(keep_last, 1) :]} | {keep}
    newest = committed[-1][0]
    for name in storage.list_dir(out):
        match = _STEP_DIR.match(name)
        uri = storage.join(out, name)
        if match and uri not in kept and int(match.group(1)) < newest:
            storage.delete_tree(uri)


def load_latest_verified(out: str) -> tuple[Checkpoint | None, list[str]]:
    """The newest committed checkpoint under out that loads and verifies, and why each newer one
    was skipped ("URI: reason"). (None, []) when out holds no committed checkpoint; raises
    CheckpointError when it holds some but none verifies."""
    skipped = []
    for _, uri in reversed(list_checkpoints(out)):
        try:
            return load_checkpoint(uri), skipped
        except CheckpointError as err:
            skipped.append(f"{uri}: {err}")
    if skipped:
        raise CheckpointError(f"no checkpoint under {out} verifies:\n  - " + "\n  - ".join(skipped))
    return None, []


def load_checkpoint(uri: str, with_train_state: bool = True) -> Checkpoint:
    """Load and verify a committed checkpoint (uri may also be a run directory: its latest)."""
    uri = resolve_checkpoint(uri)
    try:
        meta = json.loads(storage.read_bytes(storage.join(uri, META)))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{uri}/{META} is not valid JSON ({err}): the checkpoint is corrupt") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{uri} has checkpoint format {meta.get('format_version')}, this erw reads {FORMAT_VERSION}"
        )
    names = [MODEL, EMA] + ([STATE] if with_train_state else [])
    blobs = {}
    for name in names:
        data = storage.read_bytes(storage.join(uri, name)) if storage.exists(storage.join(uri, name)) else None
        if data is None:
            raise CheckpointError(f"{uri} is missing {name}: the checkpoint is incomplete or was tampered with")
        if _sha256(data) != meta["files"].get(name):
            raise CheckpointError(f"{uri}/{name} does not match the checksum in {META}: the file is corrupt")
        blobs[name] = data
    try:
        model_state = load_safetensors(blobs[MODEL])
        ema_state = load_safetensors(blobs[EMA])
        train_state = torch.load(io.BytesIO(blobs[STATE]), weights_only=True) if with_train_state else None
    except (SafetensorError, RuntimeError, ValueError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{uri} cannot be read ({err}): the checkpoint is corrupt") from None
    return Checkpoint(uri=uri, meta=meta, model_state=model_state, ema_state=ema_state, train_state=train_state)
