"""Pipeline parameters: their defaults (ImageNet 256 SiT-XL/2, and the laptop demo) and validation.

Every way of starting the pipeline (`erw pipeline compile|submit|schedule|run-local`) checks the
arguments here first, so a typo fails in a second on the submitting machine, not after GPUs
were allocated. The config preset named by `config` is loaded from this checkout and validated
for the world sizes the run will use.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from erw.errors import ErwError

REPO = Path(__file__).resolve().parents[1]
SCHEDULERS = ("kubernetes", "local_cwd")
TOLERATION_KEYS = {"key", "operator", "value", "effect", "toleration_seconds"}


class PipelineParamError(ErwError):
    """Pipeline arguments that cannot work; the message lists every problem."""


@dataclass
class PipelineArgs:
    """The pipeline's parameters. Defaults: ImageNet 256x256, SiT-XL/2, on a Kubernetes GPU pool."""

    config: str = "configs/imagenet256-sit-xl2.yaml"  # preset inside the image (and this checkout)
    overrides: list = field(default_factory=list)  # dotted config overrides for every step, e.g. train.lr=2e-4
    source: str = "s3://erw-data/imagenet/train"  # images: ImageFolder or .tar shards
    workspace: str = "s3://erw-runs/imagenet256-sit-xl2"  # latents, checkpoints, samples, registry
    registry: str = ""  # published-model registry file; empty: <workspace>/registry.json
    image: str = "ghcr.io/erw-project/erw:0.1.0"  # every step and every training pod
    precompute_workers: int = 8  # parallel VAE-encoding pods, one GPU each
    warmup_nodes: int = 1
    train_nodes: int = 4
    procs_per_node: int = 8  # torchrun processes per node: one per GPU
    gpus_per_node: int = 8
    cpus_per_node: int = 96
    memory_gb_per_node: int = 1000
    gpu_node_selector: dict = field(default_factory=lambda: {"erw.dev/pool": "gpu"})
    gpu_tolerations: list = field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    )
    scheduler: str = "kubernetes"  # TorchX scheduler of the training jobs: kubernetes | local_cwd
    volcano_queue: str = "erw"
    trainer_service_account: str = "erw-trainer"  # service account of the training pods (IRSA on AWS)
    s3_secret: str = "erw-s3"  # Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY; optional with IRSA
    job_timeout: str = "120h"  # per training job; the job is deleted when it passes
    max_restarts: int = 3  # whole-job restarts on pod failure (resumes from the last checkpoint)
    metrics_port: int = 9400  # base /metrics port of the training ranks (0 = off)


# The laptop demo: the bundled digits, 2 local torchrun processes on CPU, gloo.
DEMO = dict(
    config="configs/demo.yaml",
    source="runs/demo/digits",
    workspace="runs/demo/pipeline",
    precompute_workers=2,
    warmup_nodes=1,
    train_nodes=1,
    procs_per_node=2,
    gpus_per_node=0,
    cpus_per_node=1,
    memory_gb_per_node=4,
    scheduler="local_cwd",
    job_timeout="30m",
    max_restarts=0,
    metrics_port=0,
)


# Inputs of the demo that are generated on first use: path (relative to the repository) -> the
# erw command that creates it. Everything else the demo needs ships with the repository.
DEMO_INPUTS = {
    "runs/demo/digits": ["data", "digits", "--out", "runs/demo/digits"],
    # An evaluator trained on the digits stands in for Inception, which needs a download.
    "runs/demo/evaluator.pt2": ["fit-evaluator", "--images", "runs/demo/digits", "--out", "runs/demo/evaluator.pt2",
                                "--steps", "200"],
}


def defaults() -> dict[str, Any]:
    return dataclasses.asdict(PipelineArgs())


def parse_cli_arguments(pairs: list[str]) -> dict[str, Any]:
    """['train_nodes=8', 'overrides=["train.lr=2e-4"]'] -> typed values (YAML scalars, lists, maps)."""
    out: dict[str, Any] = {}
    for text in pairs:
        key, sep, raw = text.partition("=")
        if not sep or not key:
            raise PipelineParamError(f"argument {text!r} is not NAME=VALUE (e.g. train_nodes=8)")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise PipelineParamError(f"argument {key}: {raw!r} is not a valid value: {err}") from None
    return out


def resolve(arguments: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults (or `base`), updated with `arguments`, validated; raises PipelineParamError."""
    values = dict(base or defaults())
    names = list(defaults())
    unknown = []
    for key, value in arguments.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            unknown.append(f"unknown pipeline parameter {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            continue
        values[key] = value
    found = unknown + problems(values)
    if found:
        raise PipelineParamError("invalid pipeline arguments:\n  - " + "\n  - ".join(found))
    return values


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
    positive = ("precompute_workers", "warmup_nodes", "train_nodes", "procs_per_node", "cpus_per_node", "memory_gb_per_node")
    for name in positive:
        if v[name] < 1:
            out.append(f"{name} must be at least 1, got {v[name]}")
    if v["gpus_per_node"] < 0:
        out.append(f"gpus_per_node must be >= 0, got {v['gpus_per_node']}")
    elif v["gpus_per_node"] and v["procs_per_node"] > v["gpus_per_node"]:
        procs, gpus = v["procs_per_node"], v["gpus_per_node"]
        out.append(f"procs_per_node={procs} exceeds gpus_per_node={gpus}: one process per GPU")
    if v["max_restarts"] < 0:
        out.append(f"max_restarts must be >= 0, got {v['max_restarts']}")
    if not 0 <= v["metrics_port"] <= 65535 - v["procs_per_node"]:
        out.append(f"metrics_port={v['metrics_port']} is not a usable base port (0 turns /metrics off)")
    if v["scheduler"] not in SCHEDULERS:
        out.append(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {v['scheduler']!r}")
    out += _uri_problems(v)
    out += _placement_problems(v)
    from erw.launch import LaunchError, parse_duration

    try:
        parse_duration(v["job_timeout"])
    except LaunchError as err:
        out.append(f"job_timeout: {str(err).replace('--timeout ', '')}")
    return out + _config_problems(v)


def _uri_problems(v: dict[str, Any]) -> list[str]:
    from erw import storage

    out = []
    for name in ("source", "workspace", "registry"):
        uri = v[name]
        if name != "registry" and not uri:
            out.append(f"{name} is empty: give a local path or s3://BUCKET/prefix")
        elif storage.is_s3(uri):
            bucket = uri[len("s3://"):].split("/", 1)[0]
            if len(bucket) < 3:
                out.append(f"{name}={uri!r} has no bucket: use s3://BUCKET/prefix (bucket names have 3+ characters)")
    if v["scheduler"] == "kubernetes" and not storage.is_s3(v["workspace"]):
        out.append(
            f"workspace={v['workspace']!r} is a local path, but the steps of a cluster run are separate pods: "
            "use s3://BUCKET/prefix (local paths only work with scheduler=local_cwd)"
        )
    return out


def _placement_problems(v: dict[str, Any]) -> list[str]:
    out = []
    selector = v["gpu_node_selector"]
    if not all(isinstance(k, str) and isinstance(val, str) for k, val in selector.items()):
        out.append(f"gpu_node_selector must map label names to label values (strings), got {selector!r}")
    for tol in v["gpu_tolerations"]:
        if not isinstance(tol, dict) or not tol.get("key") or set(tol) - TOLERATION_KEYS:
            out.append(
                f"gpu_tolerations entry {tol!r} is not a toleration: a map with 'key' and optionally "
                "'operator', 'value', 'effect'"
            )
    return out


def _config_problems(v: dict[str, Any]) -> list[str]:
    from erw.config import ConfigError, load_config, problems as config_problems

    path = Path(v["config"])
    if not path.is_absolute():
        path = REPO / path
    if not all(isinstance(o, str) for o in v["overrides"]):
        return [f"overrides must be a list of 'section.key=value' strings, got {v['overrides']!r}"]
    try:
        cfg = load_config(path, [*v["overrides"], f"data.source={v['source']}"])
    except ConfigError as err:
        return [f"config {v['config']}: {err}"]
    found = []
    for phase, nodes in (("warmup", v["warmup_nodes"]), ("train", v["train_nodes"])):
        # Phase-specific messages name their phase (warmup.batch_size=...); the rest repeat.
        found += config_problems(cfg, max(nodes, 1) * max(v["procs_per_node"], 1), phase)
    return [f"config {v['config']}: {p}" for p in dict.fromkeys(found)]
