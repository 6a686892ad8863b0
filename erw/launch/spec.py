"""`LaunchSpec`: every setting of one launched torchrun job, as one typed value.

The pipeline builds it as a dict (one JSON parameter) and passes it to `erw launch --spec`; a user
types the same settings as flags. Both end here, so each setting, its default and its check
exist once.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from erw.config import closest, literal_mismatch
from erw.errors import ErwError

Scheduler = Literal["local_cwd", "kubernetes"]
SCHEDULERS: tuple[str, ...] = typing.get_args(Scheduler)
TOLERATION_KEYS = {"key", "operator", "value", "effect"}
TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
TOLERATION = re.compile(rf"^(?P<key>[^=:]+)(?:=(?P<value>[^:]*))?(?::(?P<effect>{'|'.join(TOLERATION_EFFECTS)}))?$")
LABEL_VALUE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?$")


class LaunchError(ErwError):
    """The job could not be launched, failed, or ran past its deadline."""


@dataclass
class LaunchSpec:
    """One torchrun job of `nodes` x `procs_per_node` processes, and where and how it runs.

    Every field is optional in `from_dict`; the defaults are the `erw launch` flag defaults.
    """

    scheduler: Scheduler = "local_cwd"
    image: str = ""  # the container every node runs (kubernetes)
    nodes: int = 1
    procs_per_node: int = 1  # torchrun processes per node, one per GPU
    gpus_per_node: int = 0
    cpus_per_node: int = 4
    memory_gb: float = 16.0  # per node; explicit because TorchX subtracts a reserve from it
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    s3_secret: str = ""  # Secret whose keys become the job's environment (AWS_ACCESS_KEY_ID ...)
    queue: str = "default"  # Volcano queue
    namespace: str = ""  # empty: the launching pod's namespace, else "default"
    service_account: str = ""
    priority_class: str = ""
    name: str = ""  # job name prefix; default erw-<command>
    instance_type: str = ""  # node.kubernetes.io/instance-type, through TorchX capabilities
    timeout: str = "72h"  # whole-job deadline; the job is deleted when it passes
    pending_timeout: str = ""  # fail with the scheduler's reasons if Pending this long; empty: only `timeout`
    max_restarts: int = 0  # restarts of the whole job after its first run
    # New jobs after one that ended preempted, each continuing from its checkpoint (a command with
    # `--resume auto` only): preemptions then do not use up the restarts that failures need.
    resubmit_preempted: int = 10
    metrics_port: int = 0  # base port of each rank's /metrics, declared on the pods; 0: none
    run_id: str = ""  # ERW_RUN_ID in the job; with `step` it identifies the job for re-attaching
    step: str = ""  # e.g. warmup|train; empty: the erw command's name
    grace_period_s: int = 600  # terminationGracePeriodSeconds: time for the checkpoint on SIGTERM

    # -- serialisation ---------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LaunchSpec:
        """Build from a JSON-like dict; an unknown key or a wrong type raises LaunchError."""
        if not isinstance(data, dict):
            raise LaunchError(f"a launch spec is a JSON object, got {type(data).__name__}: {data!r}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        errors, values = [], {}
        for key, value in data.items():
            if key not in names:
                close = closest(key, names)
                hint = f"did you mean {close!r}?" if close else f"known keys: {', '.join(names)}"
                errors.append(f"unknown launch spec key {key!r} ({hint})")
                continue
            try:
                values[key] = _coerce(value, hints[key], key)
            except LaunchError as err:
                errors.append(str(err))
        if errors:
            raise LaunchError("invalid launch spec:\n  - " + "\n  - ".join(errors))
        return cls(**values)

    @classmethod
    def parse(cls, text: str) -> LaunchSpec:
        """`--spec` argument: a JSON object, or the path of a file holding one."""
        source = "--spec"
        if not text.lstrip().startswith("{"):
            path = Path(text)
            if not path.is_file():
                raise LaunchError(f"--spec {text!r} is neither a JSON object nor an existing file")
            source, text = f"--spec file {path}", path.read_text()
        try:
            data = json.loads(text)
        except ValueError as err:
            raise LaunchError(f"{source} is not valid JSON: {err}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> LaunchSpec:
        return dataclasses.replace(self, **changes)

    # -- derived values ----------------------------------------------------------------------------

    @property
    def memory_mb(self) -> int:
        return int(self.memory_gb * 1000)

    @property
    def timeout_s(self) -> float:
        return parse_duration(self.timeout, "timeout")

    @property
    def pending_timeout_s(self) -> float | None:
        return parse_duration(self.pending_timeout, "pending_timeout") if self.pending_timeout else None

    @property
    def volcano_max_retry(self) -> int:
        """Volcano's `maxRetry` counts runs, not restarts: the job fails once RetryCount >= maxRetry.

        volcano pkg/controllers/job/state/restarting.go: `if job.Status.RetryCount >= maxRetry` ->
        Failed, and every RestartJob increments RetryCount first. So n restarts need n + 1.
        """
        return self.max_restarts + 1

    def problems(self) -> list[str]:
        """Every reason this spec cannot launch, named by its key, before anything is submitted."""
        out = []
        if self.nodes < 1:
            out.append(f"nodes must be at least 1, got {self.nodes}")
        if self.procs_per_node < 1:
            out.append(f"procs_per_node must be at least 1, got {self.procs_per_node}")
        if self.gpus_per_node < 0 or self.cpus_per_node < 1 or self.memory_gb <= 0:
            out.append("gpus_per_node must be >= 0 and cpus_per_node, memory_gb positive")
        elif self.gpus_per_node and self.procs_per_node > self.gpus_per_node:
            out.append(
                f"procs_per_node {self.procs_per_node} exceeds gpus_per_node {self.gpus_per_node}: one process per GPU"
            )
        if self.max_restarts < 0:
            out.append(f"max_restarts must be >= 0, got {self.max_restarts}")
        if self.resubmit_preempted < 0:
            out.append(f"resubmit_preempted must be >= 0, got {self.resubmit_preempted}")
        if self.grace_period_s < 0:
            out.append(f"grace_period_s must be >= 0, got {self.grace_period_s}")
        if not 0 <= self.metrics_port <= 65535 - self.procs_per_node:
            out.append(f"metrics_port {self.metrics_port} leaves no room for {self.procs_per_node} ranks")
        for key in ("timeout", "pending_timeout"):
            if key == "timeout" or self.pending_timeout:
                try:
                    parse_duration(getattr(self, key), key)
                except LaunchError as err:
                    out.append(str(err))
        for tol in self.tolerations:
            unknown = set(tol) - TOLERATION_KEYS
            if "key" not in tol or unknown:
                out.append(f"toleration {tol!r} needs 'key' and may only have {sorted(TOLERATION_KEYS)}")
            elif tol.get("effect", "") not in ("", *TOLERATION_EFFECTS):
                out.append(f"toleration {tol!r}: effect must be one of {', '.join(TOLERATION_EFFECTS)}")
        if self.step and not LABEL_VALUE.match(self.step):
            out.append(f"step {self.step!r} must be a Kubernetes label value (letters, digits, - _ .)")
        if self.scheduler == "kubernetes":
            if not self.image:
                out.append("image is required for the kubernetes scheduler (the container every node runs)")
            if not self.queue:
                out.append("queue is required for the kubernetes scheduler (a Volcano queue)")
        return out


# ---------------------------------------------------------------------------------------------
# Values typed on the command line.


def parse_toleration(text: str) -> dict[str, str]:
    """kubectl taint syntax: KEY[=VALUE][:EFFECT] -> a Kubernetes toleration (Exists without a value)."""
    match = TOLERATION.match(text)
    if not match:
        raise LaunchError(
            f"--toleration {text!r} is not KEY[=VALUE][:EFFECT] with EFFECT {', '.join(TOLERATION_EFFECTS)}"
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


def parse_duration(text: str, name: str = "timeout") -> float:
    """'90s', '45m', '72h', '3d' or plain seconds -> seconds."""
    match = DURATION.match(str(text).strip())
    if not match or float(match[1]) <= 0:
        raise LaunchError(f"{name} {text!r} is not a positive duration such as 90s, 45m, 72h or 3d")
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


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """JSON value -> the field's type; anything else is refused (no silent str(5) or int('4'))."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        if mismatch := literal_mismatch(value, annotation):
            raise LaunchError(f"{key}: must be one of {mismatch[0]}, got {value!r}{mismatch[1]}")
        return value
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise LaunchError(f"{key}: expected an object of strings to strings, got {value!r}")
        return dict(value)
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise LaunchError(f"{key}: expected a list of objects, got {value!r}")
        return [_coerce(v, typing.get_args(annotation)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise LaunchError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LaunchError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise LaunchError(f"{key}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"LaunchSpec.{key} has a type _coerce does not know: {annotation}")  # pragma: no cover
