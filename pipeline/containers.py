"""Run the DAG's steps as containers of a built image, the way a cluster runs them.

kfp.local's DockerRunner (the `docker` SDK: Docker, or podman's Docker-compatible socket) runs the
*compiled* pipeline, with the image placeholder of every step resolved to the given image as the
KFP backend's driver resolves it. Each step runs as the image's user (1000) on a read-only root
filesystem with a tmpfs at /tmp (the KFP launcher writes the component's code there), on the
host's network (so a local S3 endpoint answers), and sees only the pipeline root and the local
folders the run names (workspace, registry read-write; source, a config outside the image, the
demo's evaluator read-only), each mounted at its own path.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from pipeline.params import REPO

# Passed on to the steps: S3 endpoint and credentials, erw's own settings, thread counts.
FORWARDED_ENV_PREFIXES = ("AWS_", "ERW_")
FORWARDED_ENV = ("OMP_NUM_THREADS",)
IMAGE_USER = 1000  # the Dockerfile's USER


def image_pipeline(image: str) -> Any:
    """The compiled pipeline as kfp.local can run it, every step's image set to `image`."""
    from kfp import compiler, components

    from pipeline.dag import erw_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "pipeline.yaml")
        compiler.Compiler().compile(erw_pipeline, str(path))
        docs = list(yaml.safe_load_all(path.read_text()))
    spec = docs[0]
    for executor in spec["deploymentSpec"]["executors"].values():
        executor["container"]["image"] = image
    return components.load_component_from_text(yaml.safe_dump_all(docs, sort_keys=False))


def container_arguments(args: dict[str, Any], image_presets: Path = REPO / "configs") -> tuple[dict, list[tuple]]:
    """The pipeline arguments as the containers must see them, and the mounts (path, read_only).

    A config preset of this checkout is named relative (`configs/...`), so the image's own copy is
    used; any other local config file is mounted."""
    args = dict(args)
    mounts: list[tuple[str, bool]] = []
    config = Path(args["config"])
    if "://" not in args["config"]:
        if config.is_relative_to(image_presets):
            args["config"] = str(config.relative_to(REPO))
        else:
            mounts.append((str(config), True))
    for name, read_only in (("source", True), ("workspace", False), ("registry", False)):
        if args[name] and "://" not in args[name]:
            Path(args[name]).mkdir(parents=True, exist_ok=True)
            mounts.append((args[name], read_only))
    return args, mounts


def check_writable_by_image(paths: list[str]) -> None:
    problems = [p for p in paths if not _writable_by(Path(p), IMAGE_USER)]
    if problems:
        raise SystemExit(
            f"the image runs as uid {IMAGE_USER}, which cannot write to: {', '.join(problems)}. "
            f"Make them writable for it (e.g. `chown -R {IMAGE_USER} DIR`, or `chmod -R a+rwX DIR`)."
        )


def _writable_by(path: Path, uid: int) -> bool:
    st = path.stat()
    return bool(st.st_mode & 0o002) or (st.st_uid == uid and bool(st.st_mode & 0o200))


def docker_runner(mounts: list[tuple[str, bool]]) -> Any:
    from docker.types import Mount
    from kfp import local

    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES) or k in FORWARDED_ENV}
    return local.DockerRunner(
        read_only=True,
        tmpfs={"/tmp": "rw,mode=1777"},
        network_mode="host",
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        environment=env,
        mounts=[Mount(target=p, source=p, type="bind", read_only=ro) for p, ro in mounts],
    )
