"""Pipeline parameters: their defaults (ImageNet 256 SiT-XL/2, and the laptop demo) and validation.

Every way of starting the pipeline (`erw pipeline compile|submit|schedule|run-local`) checks the
arguments here first, so a typo fails in a second on the submitting machine, not after GPUs
were allocated. The config preset named by `config` is loaded (config_path: the working
directory, this checkout, or the presets installed with the package) and validated for the world
sizes the run will use.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from erw.errors import ErwError

REPO = Path(__file__).resolve().parents[1]
# Label keys: an optional DNS-subdomain prefix and a name of up to 63 characters (Kubernetes).
LABEL_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")
LABEL_PREFIX = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?$")
TOLERATION_OPERATORS = ("Exists", "Equal")
RETRAIN_MODES = ("scratch", "continue")

# Training-job settings the pipeline sets itself, from the parameter named, not from `launch`.
SET_BY_PIPELINE = {
    "image": "image",
    "s3_secret": "s3_secret",
    "node_selector": "gpu_node_selector",
    "tolerations": "gpu_tolerations",
    "nodes": "warmup_nodes / train_nodes",
    "run_id": "(the KFP run id)",
    "step": "(warmup / train)",
}

# The training jobs' settings (erw.launch.LaunchSpec keys) for the XL recipe on 8-GPU nodes.
LAUNCH = {
    "scheduler": "kubernetes",
    "procs_per_node": 8,  # torchrun processes per node: one per GPU
    "gpus_per_node": 8,
    # Below the node's size: a 96-vCPU node (p4d.24xlarge, ND96asr) keeps some for the kubelet,
    # system daemons and daemonsets; a request of all 96 never schedules.
    "cpus_per_node": 90,
    "memory_gb": 1000,
    "queue": "erw",  # Volcano queue (k8s/base)
    "service_account": "erw-trainer",  # the training pods' service account (IRSA on AWS)
    "timeout": "120h",  # per job; the job is deleted when it passes
    "pending_timeout": "30m",  # fail with the scheduler's reasons instead of waiting out `timeout`
    # Whole-job restarts after the first run (pod failure, eviction, reclaim), each resuming from
    # the last checkpoint. Volcano counts runs: the job gets maxRetry = max_restarts + 1.
    "max_restarts": 3,
    "metrics_port": 9400,  # base /metrics port of the ranks (0 = off)
    "grace_period_s": 600,  # SIGTERM to SIGKILL: time to write the preemption checkpoint (~11 GB for XL)
}


class PipelineParamError(ErwError):
    """Pipeline arguments that cannot work; the message lists every problem."""


@dataclass
class PipelineArgs:
    """The pipeline's parameters. Defaults: ImageNet 256x256, SiT-XL/2, on a Kubernetes GPU pool."""

    image: str = ""  # every step and every training pod; required for a cluster run
    config: str = "configs/imagenet256-sit-xl2.yaml"  # preset inside the image (and this checkout)
    overrides: list = field(default_factory=list)  # dotted config overrides for every step, e.g. train.lr=2e-4
    source: str = "s3://erw-data/imagenet/train"  # images: ImageFolder or .tar shards
    workspace: str = "s3://erw-runs/imagenet256-sit-xl2"  # latents, checkpoints, samples, registry
    registry: str = ""  # published-model registry file; empty: <workspace>/registry.json
    precompute_workers: int = 8  # parallel VAE-encoding pods, one GPU each
    # scratch: ERW warmup then phase 2 from it | continue: phase 2 from the published model for
    # continue_steps steps on the current data, no warmup (a first run with nothing published: scratch)
    retrain_mode: str = "scratch"
    continue_steps: int = 20_000
    keep_runs: int = 3  # retention at the end of every run (erw gc): finished runs kept besides the lineage
    warmup_nodes: int = 1
    train_nodes: int = 4
    # Placement of every GPU pod (precompute, evaluate, the training jobs). The label the NVIDIA GPU
    # operator's feature discovery puts on GPU nodes; change it to pick a pool.
    gpu_node_selector: dict = field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    gpu_tolerations: list = field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    )
    s3_secret: str = "erw-s3"  # Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY; optional with IRSA
    launch: dict = field(default_factory=lambda: dict(LAUNCH))  # the training jobs: LaunchSpec keys


# The laptop demo: the bundled digits, 2 local torchrun processes on CPU, gloo.
DEMO = dict(
    config="configs/demo.yaml",
    source="runs/demo/digits",
    workspace="runs/demo/pipeline",
    precompute_workers=2,
    warmup_nodes=1,
    train_nodes=1,
    launch={
        **LAUNCH,
        "scheduler": "local_cwd",
        "procs_per_node": 2,
        "gpus_per_node": 0,
        "cpus_per_node": 1,
        "memory_gb": 4,
        "timeout": "30m",
        "pending_timeout": "",
        "max_restarts": 0,
        "metrics_port": 0,
    },
)


DEMO_EVALUATOR = "runs/demo/evaluator.pt2"  # configs/demo.yaml eval.feature_network
# Inputs of the demo that are generated on first use: path (relative to the repository) -> the
# erw command that creates it. Everything else the demo needs ships with the repository.
DEMO_INPUTS = {
    "runs/demo/digits": ["data", "digits", "--out", "runs/demo/digits"],
    # An evaluator trained on the digits stands in for Inception, which needs a download.
    # At the demo's resolution (configs/demo.yaml data.resolution); 99% held-out accuracy.
    DEMO_EVALUATOR: [
        "fit-evaluator",
        "--images",
        "runs/demo/digits",
        "--out",
        DEMO_EVALUATOR,
        "--resolution",
        "16",
        "--max-shift",
        "1",
        "--steps",
        "300",
    ],
}


def defaults() -> dict[str, Any]:
    return dataclasses.asdict(PipelineArgs())


def parse_cli_arguments(pairs: list[str]) -> dict[str, Any]:
    """['train_nodes=8', 'overrides=["train.lr=2e-4"]', 'launch.max_restarts=1'] -> typed values
    (YAML scalars, lists, maps); `launch.KEY=VALUE` sets one key of the `launch` parameter."""
    out: dict[str, Any] = {}
    for text in pairs:
        key, sep, raw = text.partition("=")
        if not sep or not key:
            raise PipelineParamError(f"argument {text!r} is not NAME=VALUE (e.g. train_nodes=8)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise PipelineParamError(f"argument {key}: {raw!r} is not a valid value: {err}") from None
        if key.startswith("launch."):
            out.setdefault("launch", {})[key[len("launch.") :]] = value
        else:
            out[key] = value
    return out


def resolve(arguments: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults (or `base`), updated with `arguments`, validated; raises PipelineParamError.

    `launch` is merged key by key: launch={"max_restarts": 1} keeps the other defaults."""
    values = dict(base or defaults())
    names = list(defaults())
    unknown = []
    for key, value in arguments.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            unknown.append(f"unknown pipeline parameter {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            continue
        values[key] = {**values[key], **value} if key == "launch" and isinstance(value, dict) else value
    found = unknown + problems(values)
    if found:
        raise PipelineParamError("invalid pipeline arguments:\n  - " + "\n  - ".join(found))
    return values


def launch_spec(v: dict[str, Any], step: str) -> dict[str, Any]:
    """The LaunchSpec dict of one training step, as its component builds it (components/common.py)."""
    nodes = v["warmup_nodes"] if step == "warmup" else v["train_nodes"]
    return {
        **v["launch"],
        "image": v["image"],
        "s3_secret": v["s3_secret"],
        "node_selector": v["gpu_node_selector"],
        "tolerations": v["gpu_tolerations"],
        "nodes": nodes,
        "step": step,
    }


def problems(v: dict[str, Any]) -> list[str]:
    """Every reason these arguments cannot run, as readable lines."""
    out: list[str] = []
    types = {f.name: f.type for f in dataclasses.fields(PipelineArgs)}
    for name, kind in types.items():
        expected = {"str": str, "int": int, "list": list, "dict": dict}[kind]
        if not isinstance(v[name], expected) or (expected is int and isinstance(v[name], bool)):
            out.append(f"{name} must be a {kind}, got {v[name]!r}")
    if out:
        return out
    for name in ("precompute_workers", "warmup_nodes", "train_nodes", "continue_steps", "keep_runs"):
        if v[name] < 1:
            out.append(f"{name} must be at least 1, got {v[name]}")
    if v["retrain_mode"] not in RETRAIN_MODES:
        out.append(f"retrain_mode must be one of {', '.join(RETRAIN_MODES)}, got {v['retrain_mode']!r}")
    launch = _launch_problems(v)
    out += launch
    out += _uri_problems(v)
    out += _placement_problems(v)
    return out + ([] if launch else _config_problems(v))


def _launch_problems(v: dict[str, Any]) -> list[str]:
    from erw.launch import LaunchError, LaunchSpec

    taken = [k for k in v["launch"] if k in SET_BY_PIPELINE]
    if taken:
        return [f"launch.{k} is set by the pipeline parameter {SET_BY_PIPELINE[k]}, not in launch" for k in taken]
    out = []
    if v["launch"].get("scheduler") == "kubernetes" and not v["image"]:
        out.append(
            "image is required for a cluster run: image=REGISTRY/erw:TAG, the image built from the Dockerfile "
            "and pushed where the cluster can pull it"
        )
    try:  # nodes: checked above per phase; a missing image: just said
        spec = LaunchSpec.from_dict({**launch_spec(v, "train"), "nodes": 1, "image": v["image"] or "<image>"})
    except LaunchError as err:
        return out + [str(err).replace("invalid launch spec:", "launch:").replace("\n  - ", "\n    ")]
    return out + [f"launch: {p}" for p in spec.problems()]


def _uri_problems(v: dict[str, Any]) -> list[str]:
    from erw import storage

    out = []
    for name in ("source", "workspace", "registry"):
        uri = v[name]
        if name != "registry" and not uri:
            out.append(f"{name} is empty: give a local path or s3://BUCKET/prefix")
        elif storage.is_s3(uri):
            bucket = uri[len("s3://") :].split("/", 1)[0]
            if len(bucket) < 3:
                out.append(f"{name}={uri!r} has no bucket: use s3://BUCKET/prefix (bucket names have 3+ characters)")
    if v["launch"].get("scheduler") == "kubernetes" and not storage.is_s3(v["workspace"]):
        out.append(
            f"workspace={v['workspace']!r} is a local path, but the steps of a cluster run are separate pods: "
            "use s3://BUCKET/prefix (local paths only work with launch.scheduler=local_cwd)"
        )
    return out


def _placement_problems(v: dict[str, Any]) -> list[str]:
    """Node selector and tolerations, checked as Kubernetes would check them when the pods are created."""
    from erw.launch.spec import TOLERATION_EFFECTS, TOLERATION_KEYS

    out = []
    for key, value in v["gpu_node_selector"].items():
        prefix, _, name = str(key).rpartition("/")
        if not isinstance(value, str) or not LABEL_VALUE.match(value):
            out.append(
                f"gpu_node_selector {key!r}: value {value!r} is not a label value (a string of up to 63 "
                "letters, digits, '-', '_', '.')"
            )
        if not LABEL_NAME.match(name) or (prefix and not LABEL_PREFIX.match(prefix)):
            out.append(f"gpu_node_selector key {key!r} is not a label key ([prefix/]name, e.g. nvidia.com/gpu.present)")
    for tol in v["gpu_tolerations"]:
        if not isinstance(tol, dict) or not tol.get("key") or set(tol) - TOLERATION_KEYS:
            out.append(
                f"gpu_tolerations entry {tol!r} is not a toleration: a map with 'key' and optionally "
                "'operator', 'value', 'effect'"
            )
            continue
        operator = tol.get("operator", "Equal")
        if operator not in TOLERATION_OPERATORS:
            out.append(f"gpu_tolerations entry {tol!r}: operator must be Exists or Equal")
        elif operator == "Exists" and tol.get("value"):
            out.append(f"gpu_tolerations entry {tol!r}: operator Exists takes no value")
        if tol.get("effect", "") not in ("", *TOLERATION_EFFECTS):
            out.append(f"gpu_tolerations entry {tol!r}: effect must be one of {', '.join(TOLERATION_EFFECTS)}")
    return out


def _config_problems(v: dict[str, Any]) -> list[str]:
    from erw.config import ConfigError, load_config, problems as config_problems

    if not all(isinstance(o, str) for o in v["overrides"]):
        return [f"overrides must be a list of 'section.key=value' strings, got {v['overrides']!r}"]
    try:
        cfg = load_config(config_path(v["config"]), [*v["overrides"], f"data.source={v['source']}"])
    except ConfigError as err:
        return [f"config {v['config']}: {err}"]
    found = []
    procs = v["launch"].get("procs_per_node", 1)
    for phase, nodes in (("warmup", v["warmup_nodes"]), ("train", v["train_nodes"])):
        # Phase-specific messages name their phase (warmup.batch_size=...); the rest repeat.
        found += config_problems(cfg, max(nodes, 1) * max(procs, 1), phase)
    return [f"config {v['config']}: {p}" for p in dict.fromkeys(found)]


def config_path(config: str) -> Path:
    """Where a preset named like `configs/demo.yaml` is: relative to the working directory (the
    image's /app), else this checkout, else the presets installed with the package
    (share/erw/configs, pyproject's data-files); never inside site-packages. Absolute paths as is."""
    path = Path(config)
    if path.is_absolute() or path.exists():
        return path
    candidates = [REPO / path]
    if path.parts[:1] == ("configs",):
        candidates.append(_installed_configs() / Path(*path.parts[1:]))
    return next((c for c in candidates if c.is_file()), path)


def _installed_configs() -> Path:
    """share/erw/configs of the installed distribution, found through its RECORD (any prefix)."""
    from importlib import metadata

    try:
        files = metadata.distribution("erw").files or []
    except metadata.PackageNotFoundError:
        return Path("share/erw/configs")
    for file in files:
        if file.parts[-3:-1] == ("erw", "configs") and "share" in file.parts:
            return Path(file.locate()).resolve().parent
    return Path("share/erw/configs")
