"""Submit a job (or re-attach to the one already running for this run and step), wait for it
streaming its logs, and fail with its own reason.

The launching process (a KFP step, or a terminal) waits with a deadline; TorchX cannot see
`local_cwd` apps from another process, so waiting anywhere else is not an option. On Kubernetes
a cancelled KFP run gives this process about a second (Argo's emissary exits and the kernel kills
the rest), so the job is deleted with one direct request; the Workflow ownerReference and the
job's TTL are the backstops when even that does not happen.
"""

from __future__ import annotations

import re
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from erw.errors import PREEMPTED
from erw.launch import kube
from erw.launch.spec import LaunchError, LaunchSpec, format_duration
from erw.launch.volcano import (
    ROLE,
    build_app,
    job_labels,
    name_problems,
    scheduler_cfg,
    volcano_job,
)
from erw.training.elastic import PREEMPTION_REPORT

if TYPE_CHECKING:
    from torchx.runner import Runner
    from torchx.specs import AppStatus

TAIL_LINES = 400  # log lines per node kept for the failure report
REPORT_LINES = 20  # worker lines per node shown in it
# A worker's output under torchrun --tee: "[local_rank]:text", after a timestamp on Kubernetes.
WORKER_LINE = re.compile(r"^(?:\S+ )?\[(\d+)\]:(.+)")
ROOT_CAUSE = re.compile(
    r"Root Cause.*?rank\s*:\s*(?P<rank>\d+) \(local_rank: (?P<local_rank>\d+)\).*?exitcode\s*:\s*(?P<exitcode>-?\d+)",
    re.DOTALL,
)
TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z ")
# An API server unreachable this long ends the wait. Shorter outages (an upgrade, a failover) are
# waited out: giving up would delete a job that may have been training for days.
API_OUTAGE_S = 600.0
RETRY = object()  # read_status: no answer this time, ask again


class Terminated(LaunchError):
    """This process was asked to stop (SIGTERM: a cancelled KFP run, a drained node); the job was
    deleted, so its pods got SIGTERM too and checkpointed."""

    exit_status = PREEMPTED


class Preempted(LaunchError):
    """The job ended because its pods were stopped from outside (`erw torchrun` said so): every rank
    checkpointed, and the same command with `--resume auto` continues it."""

    exit_status = PREEMPTED


def dry_run(spec: LaunchSpec, command: list[str], module: str = "erw.cli") -> Any:
    """What would be submitted: the Volcano job as a dict (kubernetes) or TorchX's local request."""
    _raise_problems(spec, command)
    from torchx.runner import get_runner

    namespace = spec.namespace or kube.own_namespace()
    with get_runner() as runner:
        info = runner.dryrun(
            build_app(spec, command, module), spec.scheduler, cfg=scheduler_cfg(spec, namespace), workspace=None
        )
    return _volcano_job(info, spec, command) if spec.scheduler == "kubernetes" else info.request


def launch(
    spec: LaunchSpec, command: list[str], module: str = "erw.cli", poll_s: float = 5.0, out: TextIO = sys.stdout
) -> None:
    """Run the job to its end; return when it succeeded, raise LaunchError otherwise.

    The job is deleted when a deadline passes or this process gets SIGTERM, so an abandoned job
    never keeps holding GPUs.
    """
    _raise_problems(spec, command)
    write = _line_writer(out)
    job = _KubernetesJob if spec.scheduler == "kubernetes" else _LocalJob
    preemptions = 0
    with _sigterm_raises_terminated():
        while True:
            try:
                job(spec, command, module, write, poll_s).run()
                return
            except Preempted as err:
                # Volcano counts a preemption as one of the job's restarts (RestartJob increments its
                # RetryCount); a new job gives the preempted run a new budget for its failures.
                first, *rest = str(err).splitlines()
                why = (
                    "without --resume auto it would start from step 0"
                    if not resumes(command)
                    else f"{preemptions} of resubmit_preempted={spec.resubmit_preempted} used"
                    if preemptions >= spec.resubmit_preempted
                    else ""
                )
                if why:
                    raise Preempted("\n".join([first, f"No new job was submitted: {why}.", *rest])) from None
                preemptions += 1
                write(f"erw launch: {first}\n")
                write(
                    f"erw launch: submitting a new job to continue from the checkpoint "
                    f"(preemption {preemptions} of at most {spec.resubmit_preempted})\n"
                )


def resumes(command: list[str]) -> bool:
    """Whether the erw command continues from the latest checkpoint (`--resume auto`)."""
    return "--resume=auto" in command or any(a == "--resume" and b == "auto" for a, b in zip(command, command[1:]))


# ---------------------------------------------------------------------------------------------
# Waiting for a job.


@dataclass
class _Job:
    spec: LaunchSpec
    command: list[str]
    module: str
    write: Callable[[str], None]
    poll_s: float
    handle: str = ""
    tails: list[deque] = field(default_factory=list)
    streams: list[threading.Thread | None] = field(default_factory=list)
    last_seen: list[tuple] = field(default_factory=list)  # per node: timestamp of the last line printed
    age_s: float = 0.0  # how long the job has existed already (re-attached): the deadline is the job's

    def run(self) -> None:
        from torchx.specs import AppState

        spec = self.spec
        self.tails = [deque(maxlen=TAIL_LINES) for _ in range(spec.nodes)]
        self.streams = [None] * spec.nodes
        self.last_seen = [()] * spec.nodes
        with self.runner() as runner:
            self.handle = self.start(runner)
            started = time.monotonic() - self.age_s
            status, pending_since = None, time.monotonic()
            try:
                while True:
                    answer = self.read_status(runner)
                    if answer is RETRY:
                        time.sleep(self.poll_s)
                        continue
                    status = answer
                    if status is None:
                        raise LaunchError(
                            f"job {self.handle} disappeared from the scheduler (deleted by someone else?)"
                        )
                    if status.state == AppState.PENDING:
                        self.while_pending(time.monotonic() - pending_since)
                    else:
                        pending_since = time.monotonic()
                        self.follow_logs(runner, status)
                    if status.is_terminal():
                        break
                    if time.monotonic() - started > spec.timeout_s:
                        raise LaunchError(
                            f"job {self.handle} did not finish within {spec.timeout} (state {status.state.name}); "
                            "it was deleted. Raise the timeout if the job needs longer."
                        )
                    time.sleep(self.poll_s)
            except BaseException:
                if status is None or not status.is_terminal():
                    self.write(f"erw launch: deleting {self.handle}\n")
                    try:
                        self.delete(runner)
                    except Exception as err:  # keep the reason we are stopping; say what is left behind
                        self.write(f"erw launch: could not delete {self.handle}: {err}\n")
                raise
            for thread in self.streams:
                if thread is not None:
                    thread.join(timeout=30)
        elapsed = format_duration(time.monotonic() - started)
        if status.state != AppState.SUCCEEDED:
            if (node := preempted_node(self.tails)) is not None:
                raise Preempted(preemption_report(self.handle, node, self.tails, elapsed))
            raise LaunchError(failure_report(self.handle, status, self.tails, elapsed))
        self.write(f"erw launch: {self.handle} succeeded after {elapsed}\n")

    def read_status(self, runner: Runner) -> Any:
        return runner.status(self.handle)

    def follow_logs(self, runner: Runner, status: AppStatus) -> None:
        for node in range(self.spec.nodes):
            if self.streams[node] is None:
                self.streams[node] = self.stream_logs(runner, node)

    def stream_logs(self, runner: Runner, node: int) -> threading.Thread:
        multi_node = self.spec.nodes > 1

        def follow() -> None:
            try:
                for line in runner.log_lines(self.handle, ROLE, node, should_tail=True):
                    line = line if line.endswith("\n") else line + "\n"
                    stamp = _timestamp(line)
                    if stamp and stamp <= self.last_seen[node]:
                        continue  # a re-opened stream repeats what the last one printed
                    self.last_seen[node] = stamp or self.last_seen[node]
                    self.tails[node].append(line)
                    self.write(f"[node {node}] {line}" if multi_node else line)
            except Exception as err:  # logs are a convenience: the job's state decides success
                self.write(f"erw launch: log stream of node {node} ended: {err}\n")

        thread = threading.Thread(target=follow, name=f"logs-node{node}", daemon=True)
        thread.start()
        return thread

    def while_pending(self, pending_s: float) -> None:
        pass

    def runner(self) -> Runner:
        raise NotImplementedError

    def start(self, runner: Runner) -> str:
        raise NotImplementedError

    def delete(self, runner: Runner) -> None:
        raise NotImplementedError


class _LocalJob(_Job):
    def runner(self) -> Runner:
        from torchx.runner import get_runner

        return get_runner()

    def start(self, runner: Runner) -> str:
        app = build_app(self.spec, self.command, self.module)
        handle = runner.run(app, "local_cwd", cfg={}, workspace=None)
        self.write(f"erw launch: started {handle} ({self.spec.procs_per_node} process(es))\n")
        return handle

    def delete(self, runner: Runner) -> None:
        runner.delete(self.handle)


class _KubernetesJob(_Job):
    cluster: kube.Cluster
    reported: set[str]
    outage_since: float | None = None

    def runner(self) -> Runner:
        from torchx.runner import Runner
        from torchx.schedulers.kubernetes_scheduler import create_scheduler

        api = kube.api_client()
        self.cluster = kube.Cluster(api, self.spec.namespace or kube.own_namespace())
        self.reported = set()
        return Runner("torchx", {"kubernetes": create_scheduler}, scheduler_params={"client": api})

    def start(self, runner: Runner) -> str:
        from torchx.specs import make_app_handle

        spec, cluster = self.spec, self.cluster
        labels = job_labels(spec, self.command)
        if spec.run_id:
            running = self.call(lambda: cluster.active_jobs(labels), "list Volcano jobs")
            if running:
                name = running[0]["metadata"]["name"]
                handle = make_app_handle("kubernetes", "torchx", f"{cluster.namespace}:{name}")
                self.age_s = kube.age_s(running[0])
                others = f" ({len(running) - 1} more with the same labels left alone)" if len(running) > 1 else ""
                self.write(f"erw launch: re-attaching to {handle}, still {kube.job_phase(running[0])}{others}\n")
                return handle
        info = runner.dryrun(
            build_app(spec, self.command, self.module),
            "kubernetes",
            cfg=scheduler_cfg(spec, cluster.namespace),
            workspace=None,
        )
        owner = self.call(lambda: cluster.workflow_owner(kube.own_pod()), "read this pod's owner")
        info.request.resource = _volcano_job(info, spec, self.command, owner)
        handle = self.call(lambda: runner.schedule(info), "create the Volcano job")
        owned = f", owned by Workflow {owner['name']}" if owner else ""
        self.write(
            f"erw launch: submitted {handle} ({spec.nodes} node(s) x {spec.procs_per_node} process(es){owned})\n"
        )
        return handle

    def delete(self, runner: Runner) -> None:
        self.call(lambda: self.cluster.delete_job(self.handle.rsplit(":", 1)[1]), "delete the Volcano job")

    def call(self, request: Callable[[], Any], doing: str) -> Any:
        """One API request; its failure as a LaunchError that names the call (and a missing permission)."""
        from kubernetes.client.rest import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return request()
        except (ApiException, HTTPError, OSError) as err:
            raise kube.api_error(err, doing, self.cluster.namespace) from None

    def read_status(self, runner: Runner) -> Any:
        try:
            status = runner.status(self.handle)
        except Exception as err:
            if not kube.is_transient(err):
                raise kube.api_error(err, f"read the status of {self.handle}", self.cluster.namespace) from None
            now = time.monotonic()
            if self.outage_since is None:
                self.outage_since = now
                self.write(f"erw launch: the Kubernetes API did not answer ({err}); asking again\n")
            elif now - self.outage_since > API_OUTAGE_S:
                raise kube.api_error(
                    err, f"read the status of {self.handle} for {API_OUTAGE_S:.0f}s", self.cluster.namespace
                ) from None
            return RETRY
        if self.outage_since is not None:
            self.write("erw launch: the Kubernetes API answers again\n")
            self.outage_since = None
        return status

    def follow_logs(self, runner: Runner, status: AppStatus) -> None:
        # A stream ends when Volcano restarts the job (new pods, same names) or a connection drops:
        # open it again while the job runs, so the step's log never goes silent.
        for node, thread in enumerate(self.streams):
            if thread is not None and not thread.is_alive() and not status.is_terminal():
                self.streams[node] = None
        super().follow_logs(runner, status)

    def while_pending(self, pending_s: float) -> None:
        name = self.handle.rsplit(":", 1)[1]
        try:
            reasons = self.cluster.pending_reasons(name)
        except Exception as err:  # the reasons help; not having them must not stop the job
            reasons = [
                f"(could not read them: {kube.api_error(err, 'read PodGroups and events', self.cluster.namespace)})"
            ]
        for reason in reasons:
            if reason not in self.reported:
                self.reported.add(reason)
                self.write(f"erw launch: pending: {reason}\n")
        limit = self.spec.pending_timeout_s
        if limit is not None and pending_s > limit:
            said = "\n  - ".join(reasons) or "nothing (no PodGroup condition, no Warning event)"
            raise LaunchError(
                f"job {self.handle} was still Pending after {self.spec.pending_timeout}; it was deleted. "
                f"The scheduler says:\n  - {said}"
            )


def _volcano_job(info: Any, spec: LaunchSpec, command: list[str], owner: dict | None = None) -> dict[str, Any]:
    from torchx.schedulers.kubernetes_scheduler import sanitize_for_serialization

    return volcano_job(sanitize_for_serialization(info.request.resource), spec, command, owner)


# ---------------------------------------------------------------------------------------------
# Failure report.


def failure_report(handle: str, status: AppStatus, logs: list[deque], elapsed: str) -> str:
    """One readable message: which rank failed and how, its last error line, and the workers' last output."""
    text = "".join(line for node_logs in logs for line in node_logs)
    root = ROOT_CAUSE.search(text)  # torchrun's summary of the first failed worker
    culprit = f"rank {root['rank']} exited with code {root['exitcode']}" if root else f"state {status.state.name}"
    workers = [[line for line in node_logs if WORKER_LINE.match(line)] for node_logs in logs]
    failed_local = root["local_rank"] if root else None
    suspects = [
        line
        for node_lines in workers
        for line in node_lines
        if failed_local is None or WORKER_LINE.match(line)[1] == failed_local
    ]
    errors = [line for line in suspects if re.search(r"error|exception|killed|out of memory", line, re.IGNORECASE)]
    last = (errors or suspects or [""])[-1]
    reason = _structured_reason(status.structured_error_msg) or (WORKER_LINE.match(last)[2] if last else "no output")
    report = f"job {handle} failed after {elapsed}: {culprit}: {reason}"
    for node, node_lines in enumerate(workers):
        if node_lines:
            shown = "".join(node_lines[-REPORT_LINES:]).rstrip()
            report += f"\n--- last output of the workers on node {node} ---\n{shown}"
    if not any(workers):
        report += "\nThe workers printed nothing; see the job's logs above."
    return report


def preempted_node(logs: list[deque]) -> int | None:
    """The first node whose last `erw torchrun` line reports a preemption, or None.

    When one node of several is preempted, the ranks on the others lose their peers and fail: the
    preemption is the cause, their failure the consequence.
    """
    for node, node_logs in enumerate(logs):
        verdicts = [line for line in node_logs if "erw torchrun: " in line]
        if verdicts and PREEMPTION_REPORT in verdicts[-1]:
            return node
    return None


def preemption_report(handle: str, node: int, logs: list[deque], elapsed: str) -> str:
    report = (
        f"job {handle} was preempted after {elapsed} (node {node} got SIGTERM; every rank checkpointed and "
        f"exited {PREEMPTED}). The same command with --resume auto continues from that checkpoint; "
        "a pipeline step does so on its retry."
    )
    lines = [line for line in logs[node] if WORKER_LINE.match(line)][-REPORT_LINES:]
    if lines:
        report += f"\n--- last output of the workers on node {node} ---\n" + "".join(lines).rstrip()
    return report


def _structured_reason(message: str) -> str:
    """The torchelastic error file's message, when the job wrote one."""
    import json

    if not message or message == "<NONE>":
        return ""
    try:
        data = json.loads(message)
    except ValueError:
        return message
    inner = data.get("message", data) if isinstance(data, dict) else data
    if isinstance(inner, dict):
        inner = inner.get("message", inner)
    return str(inner).strip().splitlines()[-1] if str(inner).strip() else ""


# ---------------------------------------------------------------------------------------------
# Helpers.


def _raise_problems(spec: LaunchSpec, command: list[str]) -> None:
    found = spec.problems() + name_problems(spec, command)
    if found:
        raise LaunchError("cannot launch:\n  - " + "\n  - ".join(found))


def _timestamp(line: str) -> tuple:
    """Kubernetes' RFC 3339 line prefix as a comparable value; () when the line has none (local)."""
    match = TIMESTAMP.match(line)
    return (match[1], (match[2] or "").ljust(9, "0")) if match else ()


def _line_writer(out: TextIO) -> Callable[[str], None]:
    lock = threading.Lock()

    def write(text: str) -> None:
        with lock:
            out.write(text)
            out.flush()

    return write


class _sigterm_raises_terminated:
    """While waiting, SIGTERM raises Terminated in the main thread, so the job is deleted on the way
    out. Only the first one: a second must not interrupt that delete."""

    def __enter__(self) -> None:
        self._previous = None
        self._raised = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._raise)

    def _raise(self, signum: int, frame: Any) -> None:
        if not self._raised:
            self._raised = True
            raise Terminated("stopped by SIGTERM; the job was deleted")

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
