"""`erw torchrun`: torchrun whose exit status tells a preemption from a failure.

Plain torchrun (torch.distributed.run) exits 1 for both. On SIGTERM (what Kubernetes sends to a
pod's main process) it forwards the signal to its workers, waits up to
TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30) for them to exit, then raises
SignalException and exits 1 with a traceback, although every rank checkpointed and exited 143.
And when its workers exit 143 on their own, it reports a ChildFailedError: exit 1 again.

This runs the same torchrun in this process and maps its outcome:

    a termination signal received by torchrun    128 + the signal's number (143 for SIGTERM)
    the failed workers exited 143 (preempted),   143
    or died of torchrun's SIGTERM after one did
    anything else                                torchrun's own status (0, or 1 for a failure)

so a pod, a Volcano job policy or `erw launch` can retry a preempted run and report a failed one.
It also makes restarts in place (`--max-restarts`) safe: see RESTART_SAFE_ENV.

The preemption checkpoint's time: torchrun waits `--shutdown-timeout` seconds (else
TORCH_ELASTIC_SHUTDOWN_TIMEOUT, else 30) between forwarding SIGTERM and SIGKILLing its workers, so
that wait, not the pod's terminationGracePeriodSeconds, bounds the checkpoint. `erw launch` sets it
from the pod's grace period (`agent_shutdown_timeout_s`), and this tells the workers what they got:
GRACE_ENV, the wait minus a margin to exit, which `erw warmup|train` take as their grace period
unless the config sets one (`grace_period_s`).
Usage is torchrun's: `erw torchrun --nproc-per-node 2 --no-python erw train ...`.
"""

from __future__ import annotations

import os
import signal
import sys

from erw.errors import PREEMPTED

# `erw torchrun`'s last line after a preemption; `erw launch` looks for it in a failed job's logs.
PREEMPTION_REPORT = "erw torchrun: preempted (the workers checkpointed)"
# torchrun's agent shares one TCPStore across every restart of its workers (torch >= 2.4), and the
# workers' process-group keys of a dead incarnation stay in it: the restarted group can read a dead
# rank's gloo address and hang in connectFullMesh until the 30-minute init timeout (seen here, 1 in
# 2 trials). Not shared, each rendezvous round gets a fresh store (tests/chaos: 7 of 7 re-formed).
RESTART_SAFE_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}

# After SIGTERM: the seconds a rank may spend on its checkpoint, exported by `erw torchrun` to its workers.
GRACE_ENV = "ERW_GRACE_PERIOD_S"
# Without `erw torchrun` above (plain torchrun, a bare process): both torchrun and Kubernetes wait 30 s.
DEFAULT_GRACE_S = 25.0
# torchrun's wait when neither --shutdown-timeout nor TORCH_ELASTIC_SHUTDOWN_TIMEOUT is set
# (torch/distributed/launcher/api.py, LaunchConfig.__post_init__).
TORCHRUN_SHUTDOWN_TIMEOUT_S = 30
# A rank still has to leave after its checkpoint is committed (barrier, loader workers, process group).
WORKER_EXIT_MARGIN_S = 5
# torchrun still has to exit (and report 143) after its workers, before the pod's SIGKILL.
AGENT_EXIT_MARGIN_S = 10


def agent_shutdown_timeout_s(pod_grace_period_s: int) -> int:
    """torchrun's --shutdown-timeout in a pod that is SIGKILLed pod_grace_period_s after SIGTERM."""
    return max(0, pod_grace_period_s - AGENT_EXIT_MARGIN_S)


def worker_grace_s(shutdown_timeout_s: float) -> float:
    """The checkpoint time of a worker whose torchrun SIGKILLs it shutdown_timeout_s after SIGTERM."""
    return max(0.0, shutdown_timeout_s - WORKER_EXIT_MARGIN_S)


def grace_period_s(configured: float | None) -> float:
    """A rank's checkpoint time after SIGTERM: the config's if set, else what `erw torchrun` granted."""
    if configured is not None:
        return configured
    granted = os.environ.get(GRACE_ENV)
    return float(granted) if granted else DEFAULT_GRACE_S


def exit_status_of(error: BaseException) -> int | None:
    """The exit status a torchrun outcome maps to (None: not an outcome this module maps)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if isinstance(error, SignalException):
        return 128 + int(error.sigval)
    if isinstance(error, ChildFailedError):
        codes = {failure.exitcode for failure in error.failures.values()}
        # A SIGTERM reaching one rank preempts them all (they agree, checkpoint, exit 143); the first
        # to exit makes torchrun SIGTERM the others, which may die of it (-15) on their way out.
        return PREEMPTED if PREEMPTED in codes and codes <= {PREEMPTED, -signal.SIGTERM} else 1
    return None


def torchrun(argv: list[str]) -> int:
    """Run torchrun with argv (its own command line) and return the mapped exit status."""
    from torch.distributed import run as torch_run
    from torch.distributed.elastic.multiprocessing.errors import record

    for name, value in RESTART_SAFE_ENV.items():
        os.environ.setdefault(name, value)
    try:
        args = torch_run.parse_args(argv)
    except SystemExit as done:  # torchrun's argparse (--help, bad flags)
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 2)
    shutdown_timeout = args.shutdown_timeout
    if shutdown_timeout is None:  # resolved as torch's LaunchConfig does
        shutdown_timeout = int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", TORCHRUN_SHUTDOWN_TIMEOUT_S))
    os.environ[GRACE_ENV] = f"{worker_grace_s(shutdown_timeout):g}"  # the workers inherit it
    try:
        record(torch_run.run)(args)  # as torch_run.main: the error file TorchX reports
    except BaseException as err:
        status = exit_status_of(err)
        if status is None:
            raise
        what = PREEMPTION_REPORT if status == PREEMPTED else f"erw torchrun: failed: {err}"
        print(f"{what}; exit status {status}", file=sys.stderr, flush=True)
        return status
    return 0
