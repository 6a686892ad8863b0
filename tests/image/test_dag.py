"""The demo DAG with every step a container of the built image (kfp.local's DockerRunner through
the `docker` SDK; podman's Docker-compatible socket here), against the same DAG run as
subprocesses of this environment with the same settings: the same scores, reached inside the
containers as uid 1000 on a read-only root with only the pipeline root and the run's folders
mounted (pipeline/containers.py)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from pipeline.local import run_local

pytestmark = pytest.mark.image

# The demo, shortened: the comparison is of the two runs, not of the demo's quality.
SHORT = ["warmup.steps=100", "train.steps=200", "train.ckpt_every=200", "sample.num_samples=100"]
SCORES = ("fid", "class_accuracy", "inception_score", "precision", "recall")


@pytest.fixture(scope="module")
def docker_api(engine, tmp_path_factory):
    """DOCKER_HOST for the docker SDK: podman's Docker-compatible API on a socket of its own."""
    if engine.cli == "docker":
        yield
        return
    socket = tmp_path_factory.mktemp("podman") / "podman.sock"
    service = subprocess.Popen(
        [engine.cli, "system", "service", "--time", "0", f"unix://{socket}"], env=engine.env, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while not socket.exists():
        assert service.poll() is None and time.monotonic() < deadline, "podman system service did not start"
        time.sleep(0.2)
    patch = pytest.MonkeyPatch()
    patch.setenv("DOCKER_HOST", f"unix://{socket}")
    try:
        yield
    finally:
        patch.undo()
        service.terminate()
        service.wait(30)


def writable_folder(path: Path) -> Path:
    """A folder the image's user (uid 1000) can write into, as a pod's volume would be."""
    path.mkdir(parents=True)
    path.chmod(0o777)
    return path


def owners(folder: Path) -> set[int]:
    return {p.stat().st_uid for p in folder.rglob("*") if p.is_file()}


def test_demo_dag_in_containers_scores_as_on_this_machine(image, docker_api, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the same threads on both sides: the same float sums
    runs = {}
    for where, container_image in (("here", None), ("containers", image)):
        root = writable_folder(tmp_path / where)
        arguments = {"overrides": SHORT, "workspace": str(writable_folder(root / "workspace"))}
        runs[where] = run_local(arguments, use_cache=False, local_dir=root, image=container_image)
    here, inside = (runs[w].scores() for w in ("here", "containers"))

    # Everything the containers wrote in the workspace is uid 1000's: the steps ran in the image.
    assert owners(tmp_path / "containers" / "workspace") == {1000}
    assert 1000 not in owners(tmp_path / "here" / "workspace")
    for name in SCORES:
        assert inside[name] == pytest.approx(here[name], rel=1e-4, abs=1e-6), (name, inside, here)
    shown = ", ".join(f"{n} {inside[n]:.4g}" for n in SCORES)
    print(f"\ndemo DAG ({' '.join(SHORT)}) in containers of {image}: {shown}; here: the same")
    print(runs["containers"].summary())
