"""`erw torchrun`'s shutdown wait: how long a SIGTERM'd worker has for its preemption checkpoint
before torchrun SIGKILLs it, and the grace period it tells the workers (real torchrun processes)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from erw.training import elastic

BIN = Path(sys.executable).parent
# A worker whose "checkpoint" after SIGTERM takes CHECKPOINT_S, longer than torchrun's default
# 30 s wait; it writes the file only when that finishes, then exits 143 like `erw train`.
CHECKPOINT_S = 35
SLOW_CHECKPOINT_WORKER = f"""
import os, signal, sys, time
out, terminated = sys.argv[1], []
signal.signal(signal.SIGTERM, lambda *_: terminated.append(1))
open(out + ".started", "w").close()
while not terminated:
    time.sleep(0.1)
time.sleep({CHECKPOINT_S})
with open(out, "w") as f:
    f.write(os.environ.get("{elastic.GRACE_ENV}", "unset"))
sys.exit(143)
"""


def preempt(tmp_path, *torchrun_args, env=None):
    """Run the worker under `erw torchrun`, SIGTERM torchrun once the worker waits, return the exit status."""
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(SLOW_CHECKPOINT_WORKER))
    out = tmp_path / "checkpoint"
    cmd = [
        str(BIN / "erw"),
        "torchrun",
        *torchrun_args,
        "--nproc-per-node",
        "1",
        "--no-python",
        sys.executable,
        str(worker),
        str(out),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        while not Path(f"{out}.started").exists():  # polled, not timed: the worker is up
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, output


def test_a_sigtermed_worker_gets_the_configured_shutdown_timeout(tmp_path):
    """With --shutdown-timeout 60 (what `erw launch` sets from the pod's grace period) the worker
    finishes a 35 s checkpoint that torchrun's default 30 s would cut off, and the job exits 143."""
    status, out, output = preempt(tmp_path, "--shutdown-timeout", "60")
    assert out.exists(), f"the worker was killed before its checkpoint finished:\n{output}"
    assert out.read_text() == "55"  # the grace period it was told: 60 s less the margin to exit
    assert status == 143, output
    assert "erw torchrun: preempted" in output


@pytest.mark.slow
def test_torchruns_default_wait_kills_a_longer_checkpoint(tmp_path):
    """The fault the setting above fixes: torchrun's own 30 s cap, whatever the pod's grace period."""
    status, out, output = preempt(tmp_path)
    assert not out.exists(), output
    assert status == 143  # still a preemption: retry from the previous checkpoint


REPORT_GRACE = f"import os; print('grace', os.environ['{elastic.GRACE_ENV}'])"


@pytest.mark.parametrize(
    "args, env, expected",
    [
        ([], {}, "25"),  # torchrun's default 30 s: the same 25 s a worker without erw torchrun assumes
        (["--shutdown-timeout", "100"], {}, "95"),
        ([], {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "12"}, "7"),  # torch's own variable counts too
        (["--shutdown-timeout", "3"], {}, "0"),
    ],
)
def test_erw_torchrun_tells_its_workers_their_grace_period(tmp_path, args, env, expected):
    environment = {
        k: v for k, v in os.environ.items() if k not in (elastic.GRACE_ENV, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
    }
    proc = subprocess.run(
        [
            str(BIN / "erw"),
            "torchrun",
            *args,
            "--nproc-per-node",
            "1",
            "--no-python",
            sys.executable,
            "-c",
            REPORT_GRACE,
        ],
        cwd=tmp_path,
        env={**environment, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"grace {expected}\n" in proc.stdout


def test_a_rank_takes_the_configured_grace_period_else_the_granted_one(monkeypatch):
    monkeypatch.delenv(elastic.GRACE_ENV, raising=False)
    assert elastic.grace_period_s(None) == elastic.DEFAULT_GRACE_S == 25
    monkeypatch.setenv(elastic.GRACE_ENV, "575")
    assert elastic.grace_period_s(None) == 575
    assert elastic.grace_period_s(40.0) == 40  # the config's, when set
    # the pod's 600 s: torchrun waits 590 s, the rank checkpoints within 585 s
    assert elastic.worker_grace_s(elastic.agent_shutdown_timeout_s(600)) == 585
