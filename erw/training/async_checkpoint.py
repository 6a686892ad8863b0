"""Checkpoints written off the training loop's critical path.

The loop hands a `TrainState` to `CheckpointWriter.submit`, which copies it to CPU memory once
(weights, EMA, optimizer moments, data position: a consistent snapshot of that step) and returns;
a background thread serialises, hashes and writes the files and commits them with meta.json last
(erw.training.checkpoint's protocol, unchanged: a write cut short leaves no committed checkpoint).
At most one write is in flight: a submit while one runs first waits for it. A write that failed
raises in the training thread at the next submit or wait, so a broken checkpoint store still stops
the run, one checkpoint later at most.

Why our own format rather than torch.distributed.checkpoint's async_save: the model is replicated
(DDP), so rank 0 holds the whole state and nothing needs resharding; the files stay single
safetensors that REPA/ERW tooling reads, each verified by the sha256 in meta.json; and every
checkpoint written before stays loadable. DCP becomes the better choice once the state is sharded
(FSDP), where each rank must write its own part.
"""

from __future__ import annotations

import errno
import threading
import time
from typing import Any, Callable

import torch

from erw.config import Config
from erw import storage
from erw.storage import StorageError
from erw.training import checkpoint as ckpt
from erw.training.step import TrainState


class CheckpointWriteError(ckpt.CheckpointError):
    """A checkpoint could not be written (full disk, storage down): what failed, how to fix it,
    and which earlier checkpoint `--resume auto` will continue from."""


def write_failure(err: BaseException, *, out: str, step: int, phase: str, previous: str) -> CheckpointWriteError:
    """The one-message error for a failed write of checkpoint `step` under `out`."""
    target = ckpt.step_uri(out, step)
    if isinstance(err, OSError) and err.errno is not None:
        code = errno.errorcode.get(err.errno, str(err.errno))
        where = f" ({err.filename})" if err.filename else ""
        what = f"{code} {err.strerror or err}{where}"
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = f"Free space under {out}, or set {phase}.out to a location with room"
        else:
            fix = f"Fix the location {out}, or set {phase}.out to another one"
    else:
        what, fix = str(err), "Wait for the storage to come back"
    if previous:
        tail = (
            f"{fix}. The previous checkpoint {previous} is intact: `--resume auto` continues from it "
            f"(with another {phase}.out: --resume {previous})"
        )
    else:
        tail = f"{fix}. No checkpoint of this run was committed before: a rerun starts from step 0"
    partial = "is never loaded" if storage.is_s3(out) else "was removed"  # see ckpt.save_checkpoint
    return CheckpointWriteError(f"cannot write checkpoint {target}: {what}. The partial write {partial}. {tail}")


def cpu_snapshot(value: Any) -> Any:
    """A copy of value in which every tensor is a fresh CPU tensor (training may change the
    originals in place the moment this returns); containers are copied, plain values shared."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: cpu_snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cpu_snapshot(v) for v in value)
    return value


class CheckpointWriter:
    """Writes one phase's checkpoints under `out`, in the background or (asynchronous=False) inline.

    on_done(seconds, ok) is called after each write (from the writer thread when asynchronous)."""

    def __init__(
        self,
        out: str,
        keep_last: int,
        *,
        asynchronous: bool = True,
        log: Callable[[str], None] = print,
        on_done: Callable[[float, bool], None] = lambda seconds, ok: None,
        last_committed: str = "",
    ):
        self.out, self.keep_last, self.asynchronous = out, keep_last, asynchronous
        self.log, self.on_done = log, on_done
        # URI of the newest committed checkpoint of this run: this writer's last, or the one resumed from
        self.last_committed = last_committed
        self.last_seconds: float | None = None  # duration of the last write, staging included
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, state: TrainState, *, phase: str, config: Config, extra_meta: dict[str, Any]) -> None:
        """Snapshot state at its current step and write it (return at once when asynchronous)."""
        self.wait()
        started = time.perf_counter()
        snapshot = {
            "model_state": cpu_snapshot(state.model.state_dict()),
            "ema_state": cpu_snapshot(state.ema.state_dict()),
            "train_state": cpu_snapshot(state.state_dict()),
        }
        job = dict(step=state.step, phase=phase, config=config, extra_meta=extra_meta, **snapshot)
        if not self.asynchronous:
            self._write(job, started)
            self._raise_error()
            return
        self._thread = threading.Thread(target=self._write, args=(job, started), name="erw-checkpoint", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the write in flight (at most timeout seconds); re-raise its failure.
        True when no write is in flight any more."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
            self._thread = None
        self._raise_error()
        return True

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _write(self, job: dict[str, Any], started: float) -> None:
        try:
            uri = ckpt.save_checkpoint(self.out, **job)
        except BaseException as err:  # handed to the training thread, which raises it
            if isinstance(err, (OSError, StorageError)):
                err = write_failure(
                    err, out=self.out, step=job["step"], phase=job["phase"], previous=self.last_committed
                )
            self._error = err
            self.on_done(time.perf_counter() - started, False)
            return
        self.last_seconds = time.perf_counter() - started
        self.last_committed = uri
        self.on_done(self.last_seconds, True)
        self.log(f"checkpoint {uri}")
        try:
            ckpt.prune_checkpoints(self.out, self.keep_last, keep=uri)
        except (OSError, StorageError) as err:  # the new checkpoint is committed: training need not stop
            self.log(f"warning: could not delete checkpoints older than {uri} ({err}); they stay until the next prune")
