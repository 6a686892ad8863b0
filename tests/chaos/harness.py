"""What the chaos suite (tests/chaos/) and bench/chaos.py share: tiny runs of `erw train` as real
processes (alone, or 2 ranks under `erw torchrun`, CPU/gloo), with faults injected through
erw/faults.py and tests/s3proxy.py, and the measures of what a fault cost.

A run is the demo config shrunk to a 4-block, 64-wide SiT on the digits shards with the demo's
one DataLoader worker: `STEPS` optimizer steps, a checkpoint every `CKPT_EVERY`.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from erw import storage
from erw.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STEPS, CKPT_EVERY = 8, 2
TINY = [
    "model.depth=4",
    "model.hidden_size=64",
    "model.num_heads=2",
    "model.projector_dim=32",
    "data.num_workers=1",
    "data.shuffle_buffer=64",
    "encoder.name=none",
    "train.log_every=1",
    "train.ema_decay=0.9",
    f"train.ckpt_every={CKPT_EVERY}",
    "train.keep_last=10",
]
# Restart in place: a c10d rendezvous hosted by the torchrun agent on this port range's free port.
# The timeouts bound how long a re-formed group may take to gather (join) and how long the
# agent waits for a dead peer's heartbeat before it calls the round off (last_call/close).
RDZV_CONF = "join_timeout=120,last_call_timeout=5,close_timeout=30"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_shards(work: Path) -> Path:
    """The digits as 16-px (the demo preset's) identity-codec shards of 500 samples (4 shards, 1,797 samples)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for args in (
        ["data", "digits", "--out", "digits"],
        [
            "precompute",
            "--no-progress",
            "data.source=digits",
            "data.shards=shards",
            "data.resolution=16",
            "data.codec=identity",
            "precompute.shard_size=500",
        ],
        ["precompute", "--merge", "data.shards=shards"],
    ):
        subprocess.run([str(BIN / "erw"), *args], cwd=work, env=env, check=True, capture_output=True, timeout=600)
    return work / "shards"


def first_shard(shards: Path) -> str:
    """The shard a single process with one loader worker opens first."""
    from erw.config import load_config
    from erw.data.loader import ShardLoader, read_manifest

    seed = load_config(ROOT / "configs/demo.yaml").seed
    manifest = read_manifest(str(shards))
    loader = ShardLoader(str(shards), manifest, 32, 0, 1, seed, 1, 64, with_images=False)
    return manifest["shards"][loader.plan.pieces(0, 0)[0][0]]["name"].rsplit("/", 1)[
        -1
    ]  # ERW_FAULT_CORRUPT_SHARD takes a file name


def train_command(
    shards: str,
    out: str,
    *,
    ranks: int = 2,
    steps: int = STEPS,
    restarts: int | None = None,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """`erw train --resume auto` of the tiny model; with ranks > 1 under `erw torchrun` (restarts:
    that many restarts in place, through a c10d rendezvous; None: static rendezvous, no restart)."""
    train = [
        str(BIN / "erw"),
        "train",
        "--config",
        str(ROOT / "configs/demo.yaml"),
        f"data.shards={shards}",
        *TINY,
        f"train.steps={steps}",
        f"train.out={out}",
        *extra,
        "--resume",
        "auto",
    ]
    if ranks == 1:
        return train
    launcher = [str(BIN / "erw"), "torchrun", "--nproc-per-node", str(ranks)]
    if restarts is None:
        launcher += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    else:
        launcher += [
            "--max-restarts",
            str(restarts),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{free_port()}",
            "--rdzv-id",
            f"chaos-{os.getpid()}-{time.time_ns()}",
            "--rdzv-conf",
            RDZV_CONF,
        ]
    return [*launcher, "--no-python", *train]


@dataclass
class Outcome:
    status: int
    output: str
    seconds: float

    def resumed_at(self) -> list[int]:
        """The step each incarnation of the run started from, in order (every run of the harness
        passes --resume auto, so each incarnation says where it starts)."""
        starts = []
        for line in self.output.splitlines():
            if m := re.search(r"resumed train from \S+ at step (\d+)", line):
                starts.append(int(m.group(1)))
            elif re.search(r"--resume auto: no checkpoint under \S+ yet", line):
                starts.append(0)
        return starts


def run(
    cmd: list[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = 400,
    on_line: Callable[[str], None] | None = None,
) -> Outcome:
    """Run cmd to its end, streaming its output through on_line. After `timeout` seconds its whole
    process group is killed and the status is 124 (a hang)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    hung = threading.Event()

    def kill() -> None:
        hung.set()
        os.killpg(proc.pid, 9)

    timer = threading.Timer(timeout, kill)
    timer.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(line)
        status = proc.wait()
    finally:
        timer.cancel()
    return Outcome(124 if hung.is_set() else status, "".join(lines), time.monotonic() - started)


def schedule_s3_blips(proxy) -> Callable[[str], None]:
    """The S3 faults of the chaos matrix, on a tests/s3proxy.py FaultProxy: 5xx and SlowDown,
    connection resets and a stalled read from the start, then a 5 s outage once step 3 is logged
    (the step-4 checkpoint is written into it). Returns the run's on_line callback."""
    proxy.fail(4, status=503, code="SlowDown")
    proxy.fail(2, status=500, code="InternalError")
    proxy.reset(3)
    proxy.stall(1, after=4096)

    def on_line(line: str) -> None:
        if line.startswith("train step 3/"):
            proxy.outage(5)

    return on_line


def identical(a: str, b: str) -> tuple[bool, float]:
    """(model and EMA weights equal tensor by tensor, the largest absolute difference)."""
    x, y = ckpt.load_checkpoint(a), ckpt.load_checkpoint(b)
    diff, same = 0.0, True
    for part in ("model_state", "ema_state"):
        for name, tensor in getattr(x, part).items():
            other = getattr(y, part)[name]
            same = same and torch.equal(tensor, other)
            diff = max(diff, float((tensor - other).abs().max()))
    return same, diff


def upload_tree(folder: Path, uri: str) -> None:
    """Copy every file under folder to uri (e.g. the shards to an S3 prefix), keeping relative paths."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            storage.write_bytes(storage.join(uri, path.relative_to(folder).as_posix()), path.read_bytes())


def read_trace(folder: Path) -> dict[int, list[dict]]:
    """rank -> the batches it took, in order (ERW_FAULT_TRACE lines)."""
    return {
        int(p.stem.split("-")[1]): [json.loads(line) for line in p.read_text().splitlines()]
        for p in sorted(folder.glob("rank-*.jsonl"))
    }


def effective(trace: dict[int, list[dict]], starts: list[int]) -> dict[int, list[int]]:
    """rank -> the sample ids of the batches whose updates survived: of each incarnation (a pid,
    in order), the batches up to the step the next one resumed from."""
    kept = {}
    for rank, lines in trace.items():
        incarnations: list[list[dict]] = []
        for line in lines:
            if not incarnations or incarnations[-1][0]["pid"] != line["pid"]:
                incarnations.append([])
            incarnations[-1].append(line)
        if len(incarnations) != len(starts):
            raise AssertionError(
                f"rank {rank}: {len(incarnations)} incarnations in the trace, {len(starts)} in the log"
            )
        ids: list[int] = []
        for i, batches in enumerate(incarnations):
            upto = starts[i + 1] - starts[i] if i + 1 < len(starts) else len(batches)
            ids += [s for b in batches[:upto] for s in b["index"]]
        kept[rank] = ids
    return kept


@dataclass(frozen=True)
class SampleCount:
    twice: int  # sample draws trained on more often than in the uninterrupted run
    never: int  # sample draws the uninterrupted run trained on and this one did not
    same_order: bool


def compare_samples(got: dict[int, list[int]], want: dict[int, list[int]]) -> SampleCount:
    a = Counter(s for ids in got.values() for s in ids)
    b = Counter(s for ids in want.values() for s in ids)
    return SampleCount(sum((a - b).values()), sum((b - a).values()), got == want)


def steps_lost(trace: dict[int, list[dict]], starts: list[int]) -> int:
    """Optimizer steps computed and thrown away: the batches each incarnation took past the step
    the next one resumed from (rank 0's trace; every rank takes one batch per step)."""
    lines = trace[0]
    counts = [sum(1 for _ in group) for _, group in itertools.groupby(lines, key=lambda line: line["pid"])]
    return sum(max(0, counts[i] - (starts[i + 1] - starts[i])) for i in range(len(counts) - 1))
