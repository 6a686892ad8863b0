"""`erw launch`: run `erw warmup|train` as a torchrun job through TorchX and wait for it.

In the cluster the job is a Volcano job (TorchX `kubernetes` scheduler): one pod per node,
gang-scheduled, on the GPU node pool. Locally it is torchrun processes (`local_cwd`). Either
way the launching process (a KFP step, or a terminal) waits for the job with a deadline,
streams its logs, and fails with the job's own failure reason. TorchX cannot see `local_cwd`
apps from another process, so waiting anywhere else is not an option.

    erw launch --scheduler kubernetes --image REPO/erw:TAG --nodes 4 --procs-per-node 8 \\
        --gpus-per-node 8 --node-selector pool=h100 --toleration nvidia.com/gpu:NoSchedule \\
        -- train --config configs/imagenet256-sit-xl2.yaml --resume auto
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, TextIO

from erw.errors import ErwError

if TYPE_CHECKING:
    from torchx.specs import AppDef, AppStatus

SCHEDULERS = ("kubernetes", "local_cwd")
LAUNCHABLE = ("warmup", "train")  # the erw commands that run as one process per GPU
ROLE = "trainer"  # TorchX role name: pods are <job>-trainer-<node>-0, Volcano exports VC_TRAINER_0_HOSTS
RUN_ID_LABEL = "erw.dev/run-id"
INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"  # the one nodeSelector TorchX maps from capabilities
# Cluster-wide settings the job inherits from the launching step. Credentials are deliberately
# absent: they reach the job through the Kubernetes Secret (envFrom) or the service account (IRSA).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")
TAIL_LINES = 400  # log lines per node kept for the failure report
REPORT_LINES = 20  # worker lines per node shown in it
# A worker's output under torchrun --tee: "[local_rank]:text", after a timestamp on Kubernetes.
WORKER_LINE = re.compile(r"^(?:\S+ )?\[(\d+)\]:(.+)")
ROOT_CAUSE = re.compile(
    r"Root Cause.*?rank\s*:\s*(?P<rank>\d+) \(local_rank: (?P<local_rank>\d+)\).*?exitcode\s*:\s*(?P<exitcode>-?\d+)",
    re.S,
)
DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
TOLERATION = re.compile(
    r"^(?P<key>[^=:]+)(?:=(?P<value>[^:]*))?(?::(?P<effect>NoSchedule|PreferNoSchedule|NoExecute))?$"
)


class LaunchError(ErwError):
    """The job could not be launched, failed, or ran past its deadline."""


@dataclass
class JobSpec:
    """What to run and on what: one torchrun job of `nodes` x `procs_per_node` processes."""

    erw_args: list[str]  # the erw command line, e.g. ["train", "--config", "configs/demo.yaml"]
    module: str = "erw.cli"  # what torchrun runs with `python -m`; tests swap in a small job
    nodes: int = 1
    procs_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_node: int = 4
    memory_mb_per_node: int = 16_000  # explicit: TorchX subtracts a reserve, so a default could request 0
    image: str = ""
    name: str = ""  # job name; defaults to erw-<command>
    instance_type: str = ""  # node.kubernetes.io/instance-type, through TorchX capabilities
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    s3_secret: str = ""  # Kubernetes Secret whose keys become the job's environment (AWS_ACCESS_KEY_ID ...)
    run_id: str = ""
    metrics_port: int = 0  # base port of each rank's /metrics; declared on the pods for scraping
    max_retries: int = 0


@dataclass
class SchedulerOptions:
    scheduler: str = "local_cwd"
    queue: str = "default"  # Volcano queue
    namespace: str = ""  # empty: the namespace of the launching pod, else "default"
    service_account: str = ""
    priority_class: str = ""


def problems(spec: JobSpec, opts: SchedulerOptions) -> list[str]:
    """Every reason this job cannot start, before anything is submitted."""
    out = []
    if spec.module == "erw.cli" and (not spec.erw_args or spec.erw_args[0] not in LAUNCHABLE):
        got = spec.erw_args[0] if spec.erw_args else "nothing"
        out.append(f"the command after '--' must be one of: erw {' | '.join(LAUNCHABLE)} ... (got {got!r})")
    if spec.nodes < 1:
        out.append(f"--nodes must be at least 1, got {spec.nodes}")
    if spec.procs_per_node < 1:
        out.append(f"--procs-per-node must be at least 1, got {spec.procs_per_node}")
    if spec.gpus_per_node < 0 or spec.cpus_per_node < 1 or spec.memory_mb_per_node < 1:
        out.append("--gpus-per-node must be >= 0 and --cpus-per-node, --memory-gb positive")
    elif spec.gpus_per_node and spec.procs_per_node > spec.gpus_per_node:
        out.append(
            f"--procs-per-node {spec.procs_per_node} exceeds --gpus-per-node {spec.gpus_per_node}: one process per GPU"
        )
    if spec.max_retries < 0:
        out.append(f"--max-retries must be >= 0, got {spec.max_retries}")
    if not 0 <= spec.metrics_port <= 65535 - spec.procs_per_node:
        out.append(f"--metrics-port {spec.metrics_port} leaves no room for {spec.procs_per_node} ranks")
    if opts.scheduler not in SCHEDULERS:
        out.append(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {opts.scheduler!r}")
    if opts.scheduler == "kubernetes":
        if not spec.image:
            out.append("--image is required for the kubernetes scheduler (the container every node runs)")
        if not opts.queue:
            out.append("--queue is required for the kubernetes scheduler (a Volcano queue)")
    return out


def check_config(spec: JobSpec) -> None:
    """Validate the training config for the job's world size here, not after the GPUs are allocated."""
    from erw.cli import build_parser
    from erw.config import load_config, validate

    args = build_parser().parse_args(spec.erw_args)
    validate(load_config(args.config, args.overrides), spec.nodes * spec.procs_per_node, args.phase)


def build_app(spec: JobSpec) -> AppDef:
    """The TorchX AppDef: torchrun of `python -m erw.cli <args>` on every node."""
    from torchx.components.dist import torchrun
    from torchx.specs.overlays import JOIN, set_overlay

    name = spec.name or f"erw-{spec.erw_args[0] if spec.erw_args else 'job'}"
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    env.update(spec.env)
    if spec.run_id:
        env["ERW_RUN_ID"] = spec.run_id
    app = torchrun(
        *spec.erw_args,
        m=spec.module,
        image=spec.image or "local",
        name=name,
        cpu=spec.cpus_per_node,
        gpu=spec.gpus_per_node,
        memMB=spec.memory_mb_per_node,
        j=f"{spec.nodes}x{spec.procs_per_node}",
        env=env,
        max_retries=spec.max_retries,
    )
    role = app.roles[0]
    role.name = ROLE
    if spec.instance_type:
        role.resource.capabilities[INSTANCE_TYPE_LABEL] = spec.instance_type
    for rank in range(spec.procs_per_node if spec.metrics_port else 0):
        role.port_map[f"metrics-{rank}"] = spec.metrics_port + rank
    pod: dict[str, Any] = {"spec": {}, "metadata": {"labels": {"app.kubernetes.io/part-of": "erw"}}}
    if spec.run_id:
        pod["metadata"]["labels"][RUN_ID_LABEL] = label_value(spec.run_id)
    if spec.node_selector:
        pod["spec"]["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["spec"]["tolerations"] = [dict(t) for t in spec.tolerations]
    if spec.s3_secret:
        # TorchX maps env to plain values only; the one container is matched by its image to add envFrom.
        pod["spec"][JOIN("containers", on="image")] = [
            {"image": role.image, "envFrom": [{"secretRef": {"name": spec.s3_secret, "optional": True}}]}
        ]
    set_overlay(role, "kubernetes", "V1Pod", pod)
    return app


def scheduler_cfg(opts: SchedulerOptions) -> dict[str, Any]:
    if opts.scheduler == "local_cwd":
        return {}
    cfg: dict[str, Any] = {
        "queue": opts.queue,
        "namespace": opts.namespace or _own_namespace(),
        # The spec is validated by the API server at create time; a dry run must work without one.
        "validate_spec": False,
    }
    if opts.service_account:
        cfg["service_account"] = opts.service_account
    if opts.priority_class:
        cfg["priority_class"] = opts.priority_class
    return cfg


def dry_run(spec: JobSpec, opts: SchedulerOptions) -> Any:
    """What would be submitted: the Volcano job as a dict (kubernetes) or TorchX's local request."""
    _raise_problems(spec, opts)
    from torchx.runner import get_runner
    from torchx.schedulers.kubernetes_scheduler import sanitize_for_serialization

    with get_runner() as runner:
        info = runner.dryrun(_local_env(build_app(spec), opts), opts.scheduler, cfg=scheduler_cfg(opts), workspace=None)
    request = info.request
    return sanitize_for_serialization(request.resource) if opts.scheduler == "kubernetes" else request


def launch(
    spec: JobSpec,
    opts: SchedulerOptions,
    timeout_s: float,
    poll_s: float = 5.0,
    out: TextIO = sys.stdout,
) -> None:
    """Submit the job, stream its logs to `out`, return when it succeeded; raise LaunchError otherwise.

    The job is deleted when the deadline passes or this process is told to stop (a cancelled KFP
    run sends SIGTERM), so an abandoned job never keeps holding GPUs.
    """
    _raise_problems(spec, opts)
    from torchx.runner import get_runner
    from torchx.specs import AppState

    app = _local_env(build_app(spec), opts)
    write = _line_writer(out)
    started = time.monotonic()
    with get_runner() as runner, _sigterm_as_interrupt():
        handle = runner.run(app, opts.scheduler, cfg=scheduler_cfg(opts), workspace=None)
        write(f"erw launch: submitted {handle} ({spec.nodes} node(s) x {spec.procs_per_node} process(es))\n")
        tails = [deque(maxlen=TAIL_LINES) for _ in range(spec.nodes)]
        streams: list[threading.Thread] = []
        status = None
        try:
            while True:
                status = runner.status(handle)
                if status is None:
                    raise LaunchError(f"job {handle} disappeared from the scheduler (deleted by someone else?)")
                if not streams and (status.state == AppState.RUNNING or status.is_terminal()):
                    streams = [
                        _stream_logs(runner, handle, node, spec.nodes > 1, tails[node], write)
                        for node in range(spec.nodes)
                    ]
                if status.is_terminal():
                    break
                if time.monotonic() - started > timeout_s:
                    raise LaunchError(
                        f"job {handle} did not finish within {format_duration(timeout_s)} "
                        f"(state {status.state.name}); it was deleted. Raise --timeout if the job needs longer."
                    )
                time.sleep(poll_s)
        finally:
            if status is None or not status.is_terminal():
                write(f"erw launch: deleting {handle}\n")
                runner.delete(handle)
        for thread in streams:
            thread.join(timeout=30)
    elapsed = format_duration(time.monotonic() - started)
    if status.state != AppState.SUCCEEDED:
        raise LaunchError(failure_report(handle, status, tails, elapsed))
    write(f"erw launch: {handle} succeeded after {elapsed}\n")


def failure_report(handle: str, status: AppStatus, logs: list[deque], elapsed: str) -> str:
    """One readable message: which rank failed and how, its last error line, and the workers' last output."""
    text = "".join(line for node_logs in logs for line in node_logs)
    root = ROOT_CAUSE.search(text)  # torchrun's summary of the first failed worker
    culprit = f"rank {root['rank']} exited with code {root['exitcode']}" if root else f"state {status.state.name}"
    workers = [[line for line in node_logs if WORKER_LINE.match(line)] for node_logs in logs]
    failed_local = root["local_rank"] if root else None
    suspects = [
        line for node_lines in workers for line in node_lines
        if failed_local is None or WORKER_LINE.match(line)[1] == failed_local
    ]
    errors = [line for line in suspects if re.search(r"error|exception|killed|out of memory", line, re.I)]
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


# ---------------------------------------------------------------------------------------------
# Helpers.


def parse_toleration(text: str) -> dict[str, str]:
    """kubectl taint syntax: KEY[=VALUE][:EFFECT] -> a Kubernetes toleration (Exists without a value)."""
    match = TOLERATION.match(text)
    if not match:
        raise LaunchError(
            f"--toleration {text!r} is not KEY[=VALUE][:EFFECT] with EFFECT NoSchedule, PreferNoSchedule or NoExecute"
        )
    tol = {"key": match["key"], "operator": "Equal" if match["value"] is not None else "Exists"}
    if match["value"] is not None:
        tol["value"] = match["value"]
    if match["effect"]:
        tol["effect"] = match["effect"]
    return tol


def parse_key_value(text: str, flag: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise LaunchError(f"{flag} {text!r} is not KEY=VALUE")
    return key, value


def parse_duration(text: str) -> float:
    """'90s', '45m', '72h', '3d' or plain seconds -> seconds."""
    match = DURATION.match(text.strip())
    if not match or float(match[1]) <= 0:
        raise LaunchError(f"--timeout {text!r} is not a positive duration such as 90s, 45m, 72h or 3d")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def label_value(text: str) -> str:
    """A Kubernetes label value: 63 characters of [A-Za-z0-9_.-], alphanumeric at both ends."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:63].strip("-_.")


def _raise_problems(spec: JobSpec, opts: SchedulerOptions) -> None:
    found = problems(spec, opts)
    if found:
        raise LaunchError("cannot launch:\n  - " + "\n  - ".join(found))


def _local_env(app: AppDef, opts: SchedulerOptions) -> AppDef:
    if opts.scheduler == "local_cwd":
        # torchrun must be this interpreter's: the caller's PATH may not include the venv.
        app.roles[0].env["PATH"] = os.path.dirname(sys.executable)
    return app


def _own_namespace() -> str:
    path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    try:
        with open(path) as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


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


def _stream_logs(
    runner: Any, handle: str, node: int, multi_node: bool, tail: deque, write: Callable[[str], None]
) -> threading.Thread:
    def follow() -> None:
        try:
            for line in runner.log_lines(handle, ROLE, node, should_tail=True):
                tail.append(line if line.endswith("\n") else line + "\n")
                write(f"[node {node}] {tail[-1]}" if multi_node else tail[-1])
        except Exception as err:  # logs are a convenience: the job's state decides success
            write(f"erw launch: log stream of node {node} ended: {err}\n")

    thread = threading.Thread(target=follow, name=f"logs-node{node}", daemon=True)
    thread.start()
    return thread


def _line_writer(out: TextIO) -> Callable[[str], None]:
    lock = threading.Lock()

    def write(text: str) -> None:
        with lock:
            out.write(text)
            out.flush()

    return write


class _sigterm_as_interrupt:
    """Turn SIGTERM into KeyboardInterrupt while waiting, so the job is deleted on the way out."""

    def __enter__(self) -> None:
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._raise)

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# ---------------------------------------------------------------------------------------------
# Command line.


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch",
        help="run erw warmup|train as a torchrun job (TorchX: local processes or a Volcano job)",
        description="Run `erw warmup|train ...` on N nodes x P processes and wait for it. "
        "Everything after '--' is the erw command.",
    )
    p.add_argument("--scheduler", choices=SCHEDULERS, default="local_cwd")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--procs-per-node", type=int, default=1, help="torchrun processes per node (one per GPU)")
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--cpus-per-node", type=int, default=4)
    p.add_argument("--memory-gb", type=float, default=16.0, help="memory per node (GB)")
    p.add_argument("--image", default="", help="container image (kubernetes)")
    p.add_argument("--name", default="", help="job name (default erw-<command>)")
    p.add_argument("--instance-type", default="", help=f"node type, as the {INSTANCE_TYPE_LABEL} label")
    p.add_argument(
        "--node-selector", action="append", default=[], metavar="KEY=VALUE", help="node pool label (repeatable)"
    )
    p.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE][:EFFECT]", help="repeatable")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="job environment (repeatable)")
    p.add_argument("--s3-secret", default="", help="Kubernetes Secret with the S3 credentials (kubernetes)")
    p.add_argument("--run-id", default="", help=f"run id: ERW_RUN_ID in the job and the {RUN_ID_LABEL} pod label")
    p.add_argument("--metrics-port", type=int, default=0, help="base /metrics port to declare on the pods")
    p.add_argument("--max-retries", type=int, default=0, help="restarts of the whole job on pod failure")
    p.add_argument("--queue", default="default", help="Volcano queue (kubernetes)")
    p.add_argument("--namespace", default="", help="namespace of the job (default: this pod's, else default)")
    p.add_argument("--service-account", default="", help="service account of the job's pods (kubernetes)")
    p.add_argument("--priority-class", default="", help="PriorityClass of the job (kubernetes)")
    p.add_argument("--timeout", default="72h", help="deadline, e.g. 45m, 72h; the job is deleted when it passes")
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted and exit")
    p.add_argument("command_line", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    p.set_defaults(func=_run)


def spec_from_args(args: argparse.Namespace) -> tuple[JobSpec, SchedulerOptions]:
    erw_args = list(args.command_line)
    if erw_args[:1] == ["--"]:
        erw_args = erw_args[1:]
    spec = JobSpec(
        erw_args=erw_args,
        nodes=args.nodes,
        procs_per_node=args.procs_per_node,
        gpus_per_node=args.gpus_per_node,
        cpus_per_node=args.cpus_per_node,
        memory_mb_per_node=int(args.memory_gb * 1000),
        image=args.image,
        name=args.name,
        instance_type=args.instance_type,
        node_selector=dict(parse_key_value(t, "--node-selector") for t in args.node_selector),
        tolerations=[parse_toleration(t) for t in args.toleration],
        env=dict(parse_key_value(t, "--env") for t in args.env),
        s3_secret=args.s3_secret,
        run_id=args.run_id,
        metrics_port=args.metrics_port,
        max_retries=args.max_retries,
    )
    opts = SchedulerOptions(
        scheduler=args.scheduler,
        queue=args.queue,
        namespace=args.namespace,
        service_account=args.service_account,
        priority_class=args.priority_class,
    )
    return spec, opts


def _run(args: argparse.Namespace) -> int:
    import logging
    import warnings

    logging.getLogger("torchx").setLevel(logging.WARNING)  # its INFO lines (log dirs, trackers) are noise here
    # TorchX warns about Volcano's per-task retries; the job uses whole-job restarts (RestartJob) instead.
    warnings.filterwarnings("ignore", message=r"\s*Role \S+ configured with restarts")
    spec, opts = spec_from_args(args)
    timeout_s = parse_duration(args.timeout)
    _raise_problems(spec, opts)
    check_config(spec)
    if args.dry_run:
        import yaml

        request = dry_run(spec, opts)
        print(yaml.safe_dump(request, sort_keys=False) if isinstance(request, dict) else request)
        return 0
    launch(spec, opts, timeout_s)
    return 0
