"""Fault injection: kill a rank at a step, kill the checkpoint writer after n bytes, corrupt a shard.

Off unless one of these environment variables is set (read once, when this module is first
imported; `configure()` reads them again). Unset, every hook below is a function that returns at
once, so production runs pay one call per step and per file.

    ERW_FAULT_KILL="RANK:STEP[:SIGNAL]"
        The process of global rank RANK sends itself SIGNAL (default KILL; TERM, INT or a number)
        right after optimizer step STEP, before that step's log line and checkpoint: with
        SIGKILL, the steps since the last checkpoint are lost, as on a lost node.
    ERW_FAULT_CKPT_BYTES="N[:kill|raise]"
        The checkpoint writer stops once N bytes of checkpoint files (counted over every
        checkpoint this process writes, meta.json included) have been handed to storage: the
        file that crosses N is cut there and the process is SIGKILLed (kill, the default: a local
        file leaves its first bytes in a temporary file, as a real kill mid-write does; an S3
        object is never created, as a PutObject cut off is not), or OSError(ENOSPC) is raised
        (raise: a full disk, which also leaves the first bytes in a local temporary file).
    ERW_FAULT_CORRUPT_SHARD="NAME[:flip|truncate]"
        Reading the shard whose file name is NAME (e.g. shard-000003.tar) returns its first half
        intact and then every byte inverted (flip, the default: the sample cut there is garbage, and
        tarfile takes the garbage header after it for the end of the archive), or ends there
        (truncate). The file itself is untouched; every reader of it sees the fault.

And one observation, for the chaos suite and `bench/chaos.py`:

    ERW_FAULT_TRACE=DIR
        Every rank appends, for each batch the training loop takes, one JSON line to
        DIR/rank-RANK.jsonl: {"pid", "restart", "index": [sample ids], "epoch": [epochs]}. A run
        killed and resumed can then be compared sample by sample with an uninterrupted one.

Kills fire only in the first incarnation of a torchrun job (TORCHELASTIC_RESTART_COUNT unset or
0): a restarted group that resumes before STEP does not die again at the same step. Each fault
says on stderr that it fired ("erw faults: ..."), so a log shows what was injected.

Hooks: `after_step` and `batches` in the training loop, `checkpoint_write` in the checkpoint writer,
`shard_stream` where the loader opens a shard. Call them as `faults.after_step(...)` (an
attribute of this module, looked up at each call), so that `configure()` can rebind them.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Mapping

from erw.errors import ErwError

KILL_ENV, CKPT_BYTES_ENV, CORRUPT_SHARD_ENV = "ERW_FAULT_KILL", "ERW_FAULT_CKPT_BYTES", "ERW_FAULT_CORRUPT_SHARD"
TRACE_ENV = "ERW_FAULT_TRACE"
RESTART_COUNT_ENV = "TORCHELASTIC_RESTART_COUNT"  # set by torchrun for each incarnation of the workers
CKPT_MODES, SHARD_MODES = ("kill", "raise"), ("flip", "truncate")


class FaultConfigError(ErwError):
    """An ERW_FAULT_* variable is malformed."""


@dataclass(frozen=True)
class KillAt:
    rank: int
    step: int
    signal: signal.Signals


@dataclass(frozen=True)
class CheckpointBytes:
    budget: int
    mode: str  # kill | raise


@dataclass(frozen=True)
class CorruptShard:
    name: str
    mode: str  # flip | truncate


def _signal(text: str) -> signal.Signals:
    name = text.strip().upper()
    try:
        return (
            signal.Signals(int(name))
            if name.isdigit()
            else signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
        )
    except (KeyError, ValueError):
        raise FaultConfigError(f"{KILL_ENV}: {text!r} is not a signal (use KILL, TERM, INT or a number)") from None


def parse_kill(text: str) -> KillAt:
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(p.strip().isdigit() for p in parts[:2]):
        raise FaultConfigError(f"{KILL_ENV}={text!r}: expected RANK:STEP[:SIGNAL], e.g. 1:5 or 0:12:TERM")
    return KillAt(int(parts[0]), int(parts[1]), _signal(parts[2]) if len(parts) == 3 else signal.SIGKILL)


def parse_ckpt_bytes(text: str) -> CheckpointBytes:
    budget, _, mode = text.partition(":")
    mode = mode.strip().lower() or "kill"
    if not budget.strip().isdigit() or mode not in CKPT_MODES:
        raise FaultConfigError(f"{CKPT_BYTES_ENV}={text!r}: expected N[:kill|raise], e.g. 4096 or 4096:raise")
    return CheckpointBytes(int(budget), mode)


def parse_corrupt_shard(text: str) -> CorruptShard:
    name, _, mode = text.partition(":")
    mode = mode.strip().lower() or "flip"
    if not name.strip() or "/" in name or mode not in SHARD_MODES:
        raise FaultConfigError(
            f"{CORRUPT_SHARD_ENV}={text!r}: expected a shard's file name and optionally :flip or :truncate, "
            "e.g. shard-000003.tar"
        )
    return CorruptShard(name.strip(), mode)


def _say(message: str) -> None:
    print(f"erw faults: {message}", file=sys.stderr, flush=True)


def _first_incarnation() -> bool:
    return os.environ.get(RESTART_COUNT_ENV, "0") in ("", "0")


# ---------------------------------------------------------------------------------------------
# The hooks. configure() binds each name below to a no-op or to the armed fault.


def _no_step(rank: int, step: int) -> None:
    return None


def _no_write(uri: str, data: bytes) -> None:
    return None


def _no_shard(uri: str, stream: BinaryIO) -> BinaryIO:
    return stream


def _no_trace(iterator: Iterator[dict], rank: int) -> Iterator[dict]:
    return iterator


after_step: Callable[[int, int], None] = _no_step
"""after_step(rank, step): called by the trainer once optimizer step `step` is done."""
checkpoint_write: Callable[[str, bytes], None] = _no_write
"""checkpoint_write(uri, data): called by the checkpoint writer before it stores one file."""
shard_stream: Callable[[str, BinaryIO], BinaryIO] = _no_shard
"""shard_stream(uri, stream) -> stream: called by the loader on each opened shard."""
batches: Callable[[Iterator[dict], int], Iterator[dict]] = _no_trace
"""batches(iterator, rank) -> iterator: the training loop's batch source (traced under ERW_FAULT_TRACE)."""


def _kill_hook(kill: KillAt) -> Callable[[int, int], None]:
    def hook(rank: int, step: int) -> None:
        if rank == kill.rank and step == kill.step and _first_incarnation():
            _say(f"rank {rank} sends itself {kill.signal.name} after step {step} ({KILL_ENV})")
            os.kill(os.getpid(), kill.signal)

    return hook


def _checkpoint_hook(fault: CheckpointBytes) -> Callable[[str, bytes], None]:
    written = 0

    def hook(uri: str, data: bytes) -> None:
        nonlocal written
        cut = fault.budget - written
        written += len(data)
        if written <= fault.budget:
            return
        if "://" not in uri:  # what a local write leaves when killed or out of space: its first bytes in its temp file
            path = Path(uri)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_name(f".{path.name}.tmp-{os.getpid()}").write_bytes(data[:cut])
        if fault.mode == "raise":
            _say(f"checkpoint write of {uri} fails after {cut} of {len(data)} bytes ({CKPT_BYTES_ENV})")
            raise OSError(errno.ENOSPC, f"No space left on device (injected by {CKPT_BYTES_ENV})", uri)
        _say(f"checkpoint writer killed after {cut} of {len(data)} bytes of {uri} ({CKPT_BYTES_ENV})")
        os.kill(os.getpid(), signal.SIGKILL)

    return hook


class _CorruptStream(io.RawIOBase):
    """A shard's bytes: the first `keep` intact, then inverted (flip) or none (truncate)."""

    def __init__(self, inner: BinaryIO, keep: int, mode: str):
        super().__init__()
        self.inner, self.keep, self.mode, self.pos = inner, keep, mode, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.mode == "truncate":
            buffer = memoryview(buffer)[: max(0, self.keep - self.pos)]
        data = self.inner.read(len(buffer))
        if self.mode == "flip" and self.pos + len(data) > self.keep:
            start = max(0, self.keep - self.pos)
            data = data[:start] + bytes(b ^ 0xFF for b in data[start:])
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def close(self) -> None:
        self.inner.close()
        super().close()


def _shard_hook(fault: CorruptShard) -> Callable[[str, BinaryIO], BinaryIO]:
    from erw import storage

    def hook(uri: str, stream: BinaryIO) -> BinaryIO:
        if uri.rstrip("/").rsplit("/", 1)[-1] != fault.name:
            return stream
        total = next((f.size for f in storage.list_files(uri.rsplit("/", 1)[0]) if f.path == fault.name), 0)
        what = "inverted from" if fault.mode == "flip" else "cut off at"
        _say(f"reading {uri} with its bytes {what} byte {total // 2} of {total} ({CORRUPT_SHARD_ENV})")
        return io.BufferedReader(_CorruptStream(stream, total // 2, fault.mode))

    return hook


def _trace_hook(folder: str) -> Callable[[Iterator[dict], int], Iterator[dict]]:
    def hook(iterator: Iterator[dict], rank: int) -> Iterator[dict]:
        path = Path(folder, f"rank-{rank}.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        restart = int(os.environ.get(RESTART_COUNT_ENV) or 0)
        try:
            with open(path, "a") as trace:
                for batch in iterator:
                    line = {
                        "pid": os.getpid(),
                        "restart": restart,
                        "index": batch["index"].tolist(),
                        "epoch": batch["epoch"].tolist(),
                    }
                    trace.write(json.dumps(line) + "\n")
                    trace.flush()
                    yield batch
        finally:  # the trainer closes its batch source (it stops DataLoader workers): pass it on
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    return hook


def configure(environ: Mapping[str, str] = os.environ) -> None:
    """Arm the faults that environ asks for and disarm the others."""
    global after_step, checkpoint_write, shard_stream, batches
    kill, ckpt_bytes, shard, trace = (
        environ.get(name, "").strip() for name in (KILL_ENV, CKPT_BYTES_ENV, CORRUPT_SHARD_ENV, TRACE_ENV)
    )
    after_step = _kill_hook(parse_kill(kill)) if kill else _no_step
    checkpoint_write = _checkpoint_hook(parse_ckpt_bytes(ckpt_bytes)) if ckpt_bytes else _no_write
    shard_stream = _shard_hook(parse_corrupt_shard(shard)) if shard else _no_shard
    batches = _trace_hook(trace) if trace else _no_trace


def armed() -> list[str]:
    """The variables of the faults armed now (empty: injection is off)."""
    hooks = (
        (after_step, _no_step, KILL_ENV),
        (checkpoint_write, _no_write, CKPT_BYTES_ENV),
        (shard_stream, _no_shard, CORRUPT_SHARD_ENV),
        (batches, _no_trace, TRACE_ENV),
    )
    return [name for hook, off, name in hooks if hook is not off]


configure()
