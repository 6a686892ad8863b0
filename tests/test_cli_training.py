"""`erw warmup` then `erw train --init-from` from the command line, as 2 torchrun processes (gloo)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from erw.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The demo's shipped encoder by absolute path: these commands run in a temporary directory.
TINY = [
    "model.depth=4",
    "model.hidden_size=64",
    "model.num_heads=2",
    "model.projector_dim=32",
    "data.num_workers=1",
    f"encoder.weights={ROOT / 'configs' / 'digits-encoder.safetensors'}",
]


def erw(*args, cwd, torchrun=False, check=True):
    cmd = [str(BIN / "erw"), *args]
    if torchrun:
        cmd = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--no-python", *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    work = tmp_path_factory.mktemp("digits")
    erw("data", "digits", "--out", "digits", cwd=work)
    erw(
        "precompute",
        "--no-progress",
        "data.source=digits",
        "data.shards=shards",
        "data.resolution=16",
        "data.codec=identity",
        "precompute.shard_size=500",
        cwd=work,
    )
    erw("precompute", "--merge", "data.shards=shards", cwd=work)
    return work / "shards"


def test_warmup_then_train_under_torchrun(shards, tmp_path):
    common = ["--config", str(ROOT / "configs/demo.yaml"), f"data.shards={shards}", *TINY]
    warm = erw(
        "warmup",
        *common,
        "warmup.steps=4",
        "warmup.ckpt_every=2",
        "warmup.log_every=2",
        "warmup.out=out/warmup",
        cwd=tmp_path,
        torchrun=True,
    )
    assert "2 rank(s) x 4 samples" in warm.stdout and "warmup finished at step 4" in warm.stdout
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path / "out/warmup"))] == [2, 4]

    train = erw(
        "train",
        *common,
        "train.steps=2",
        "train.ckpt_every=2",
        "train.log_every=1",
        "train.out=out/train",
        "--init-from",
        "out/warmup",
        cwd=tmp_path,
        torchrun=True,
    )
    handoff = next(line for line in train.stdout.splitlines() if line.startswith("init-from"))
    assert "step-00000004 (warmup step 4)" in handoff
    assert "blocks.1.adaLN_modulation.1.bias" in handoff and "blocks.2." not in handoff
    assert "projectors" not in handoff and "final_layer" not in handoff
    final = ckpt.load_checkpoint(str(tmp_path / "out/train"))
    assert final.step == 2 and final.meta["warmup_steps"] == 4 and final.phase == "train"


def test_cli_errors_are_one_clear_message(shards, tmp_path):
    bad = erw(
        "warmup",
        "--config",
        str(ROOT / "configs/demo.yaml"),
        "model.l2r_depth=9",
        "warmup.batch_size=31",
        cwd=tmp_path,
        check=False,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "model.l2r_depth=9 must be at least 1" in bad.stderr and "warmup.batch_size=31" not in bad.stderr
    odd = erw(
        "warmup",
        "--config",
        str(ROOT / "configs/demo.yaml"),
        "warmup.batch_size=31",
        cwd=tmp_path,
        torchrun=True,
        check=False,
    )
    assert odd.returncode != 0 and "warmup.batch_size=31 is not divisible by world size 2" in odd.stderr
    missing = erw(
        "train",
        "--config",
        str(ROOT / "configs/demo.yaml"),
        f"data.shards={shards}",
        *TINY,
        "train.out=out/train",
        "--init-from",
        str(tmp_path / "nothing"),
        cwd=tmp_path,
        check=False,
    )
    assert missing.returncode == 2 and "no complete checkpoint" in missing.stderr and "Traceback" not in missing.stderr


def terminate_at_step(cmd, cwd, step=2):
    """Start cmd, SIGTERM it when it logs `train step <step>/`; return (exit status, output)."""
    import signal

    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"train step {step}/"):
            proc.send_signal(signal.SIGTERM)
            break
    lines += proc.stdout.readlines()
    return proc.wait(timeout=120), "".join(lines)


def endless_training(shards, out):
    return [
        str(BIN / "erw"),
        "train",
        "--config",
        str(ROOT / "configs/demo.yaml"),
        f"data.shards={shards}",
        *TINY,
        "encoder.name=none",
        "train.steps=100000",
        "train.log_every=1",
        "train.ckpt_every=100000",
        f"train.out={out}",
    ]


def test_sigterm_checkpoints_and_exits(shards, tmp_path):
    """A preempted pod gets SIGTERM (its loader workers too): the run saves at the next step and exits 143."""
    status, output = terminate_at_step(endless_training(shards, "out/train"), tmp_path)
    assert status == 143, output
    assert "termination signal received, checkpointing" in output and "preempted at step" in output
    saved = ckpt.load_checkpoint(str(tmp_path / "out/train"))
    assert 2 <= saved.step < 100000


def test_preemption_under_torchrun_exits_143(shards, tmp_path):
    """R3: Kubernetes sends SIGTERM to torchrun; plain torchrun exits 1 although every rank
    checkpointed and exited 143. `erw torchrun` exits 143, so a preemption is not a failure."""
    launcher = ["--nproc-per-node", "2", "--no-python"]
    status, output = terminate_at_step([str(BIN / "torchrun"), *launcher, *endless_training(shards, "plain")], tmp_path)
    assert status == 1 and "train preempted at step" in output, output  # torchrun's own behaviour, the fault
    status, output = terminate_at_step(
        [str(BIN / "erw"), "torchrun", "--shutdown-timeout", "40", *launcher, *endless_training(shards, "erw")],
        tmp_path,
    )
    assert status == 143, output
    assert "train preempted at step" in output and "erw torchrun: preempted" in output
    # train.grace_period_s unset: the rank took what erw torchrun granted (40 s less 5 s to exit)
    assert "(grace period 35s from the signal)" in output, output
    assert ckpt.load_checkpoint(str(tmp_path / "erw")).step >= 2


def test_a_preempted_launch_continues_in_a_new_job_or_fails_its_step_with_143(shards, tmp_path):
    """`erw launch` sees the job's `erw torchrun` report the preemption (rank 1 gets SIGTERM after step
    2): it submits a new job that resumes from the preemption checkpoint; with no preemptions left
    it exits 143, and so does the pipeline step's process (components.common.run_erw)."""
    step = (
        "import sys; from components.common import run_erw; "
        "run_erw(['launch', '--procs-per-node', '2', '--timeout', '10m'] + sys.argv[1:])"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ERW_FAULT_KILL": "1:2:TERM"}

    def pipeline_step(out: str, *launch_flags: str) -> subprocess.CompletedProcess:
        train = [
            "train",
            "--config",
            str(ROOT / "configs/demo.yaml"),
            f"data.shards={shards}",
            *TINY,
            "train.steps=6",
            "train.ckpt_every=100",
            "train.log_every=1",
            f"train.out={out}",
            "--resume",
            "auto",
        ]
        return subprocess.run(
            [sys.executable, "-c", step, *launch_flags, "--", *train],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    done = pipeline_step("continued")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "erw torchrun: preempted (the workers checkpointed); exit status 143" in done.stdout
    assert "submitting a new job to continue from the checkpoint (preemption 1 of at most 10)" in done.stdout
    assert re.search(r"resumed train from \S+ at step [2-5]\n", done.stdout), done.stdout
    assert ckpt.load_checkpoint(str(tmp_path / "continued")).step == 6

    stopped = pipeline_step("stopped", "--resubmit-preempted", "0")
    assert stopped.returncode == 143, stopped.stdout + stopped.stderr
    assert re.search(r"erw launch: error: job \S+ was preempted after \S+ \(node 0 got SIGTERM", stopped.stderr)
    assert "erw launch was preempted (exit status 143)" in stopped.stderr and "Traceback" not in stopped.stderr
    assert 2 <= ckpt.load_checkpoint(str(tmp_path / "stopped")).step < 6


CRASH_WITH_WORKERS = """
import sys, torch
from erw.config import load_config
from erw.data.loader import build_loader
from erw.training.distributed import Dist
from erw.training.trainer import run

class CrashingEncoder(torch.nn.Module):
    dim = 16
    calls = 0

    def forward(self, images):
        CrashingEncoder.calls += 1
        if CrashingEncoder.calls == 3:
            raise RuntimeError("injected crash in the third step")
        return torch.zeros(images.shape[0], 64, self.dim)

cfg = load_config(sys.argv[1], sys.argv[2:])
loader = build_loader(cfg.data, cfg.train.batch_size, 0, 1, cfg.seed, with_images=True)
run(cfg, "train", loader, Dist(0, 0, 1, torch.device("cpu")), encoder=CrashingEncoder())
"""


def test_a_crash_with_loader_workers_exits(shards, tmp_path):
    """D1: an exception that is not an ErwError, with DataLoader workers running, used to leave the
    process hanging forever (the workers ignore SIGTERM and the traceback kept the loader alive)."""
    args = [
        str(ROOT / "configs/demo.yaml"),
        f"data.shards={shards}",
        *TINY,
        "data.num_workers=2",
        "train.steps=10",
        "train.batch_size=8",
        f"train.out={tmp_path}/train",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_WITH_WORKERS, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 1 and "injected crash in the third step" in proc.stderr, proc.stderr


@pytest.mark.parametrize("ranks", [1, 2])
def test_resume_is_exact_through_the_real_loader(shards, tmp_path, ranks):
    """D2: with data.num_workers >= 1 (the demo's 1) the resumed weights used to differ from the
    uninterrupted run's by 5e-3: starting the DataLoader drew from the step's random stream."""
    common = [
        "--config",
        str(ROOT / "configs/demo.yaml"),
        f"data.shards={shards}",
        *TINY,
        "encoder.name=none",
        "train.ckpt_every=2",
        "train.log_every=1",
        "train.ema_decay=0.9",
    ]
    erw("train", *common, "train.steps=4", "train.out=straight", cwd=tmp_path, torchrun=ranks == 2)
    erw("train", *common, "train.steps=2", "train.out=resumed", cwd=tmp_path, torchrun=ranks == 2)
    again = erw(
        "train", *common, "train.steps=4", "train.out=resumed", "--resume", "auto", cwd=tmp_path, torchrun=ranks == 2
    )
    assert "resumed train from" in again.stdout and "at step 2" in again.stdout
    a = ckpt.load_checkpoint(str(tmp_path / "straight/step-00000004"))
    b = ckpt.load_checkpoint(str(tmp_path / "resumed/step-00000004"))
    for part in ("model_state", "ema_state"):
        for name, tensor in getattr(a, part).items():
            assert torch.equal(getattr(b, part)[name], tensor), f"{part} {name} differs after the resume"
    assert a.train_state["data"] == b.train_state["data"]


@pytest.mark.parametrize("worker_status, expected", [(143, 143), (1, 1), (0, 0)])
def test_erw_torchrun_passes_a_preemption_up(tmp_path, worker_status, expected):
    """Workers that all exit 143 (checkpointed after SIGTERM) make `erw torchrun` exit 143, not 1."""
    cmd = [str(BIN / "erw"), "torchrun", "--nproc-per-node", "2", "--no-python", "sh", "-c", f"exit {worker_status}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == expected, proc.stderr


@pytest.mark.parametrize(
    "codes, expected",
    [
        ([143, 143], 143),
        ([143, -15], 143),  # SIGTERM reached one rank: it exited 143, torchrun SIGTERMed the other on its way out
        ([-15, -15], 1),  # nobody checkpointed
        ([143, 1], 1),
        ([-9, -15], 1),  # a lost rank
    ],
)
def test_erw_torchrun_maps_worker_exit_codes(codes, expected):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from erw.training.elastic import exit_status_of

    failures = {rank: ProcessFailure(rank, 1000 + rank, code, "/nonexistent") for rank, code in enumerate(codes)}
    assert exit_status_of(ChildFailedError("erw", failures)) == expected
