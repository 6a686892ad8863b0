"""The locks are the environment: the image installs locks/runtime.txt, the dev venv
locks/dev.txt, both hash-checked with --no-deps. These tests read the lock files themselves, so
that an edited or stale lock fails here and not in a build, and a newer release on PyPI changes
nothing (nothing is resolved at install time)."""

import subprocess
import tomllib
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.locks import LOCKS, pins_here, read_lock

REPO = LOCKS.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# The extras the dev venv installs (locks/lock.py DEV_EXTRAS).
DEV_EXTRAS = ("mlflow", "dev", "bench")


def requirements_of(name: str, extras: set[str]) -> list[Requirement]:
    """What the locked distribution `name` requires on this platform with these extras, read
    from its metadata (the venv holds exactly the lock: checked first)."""
    wanted = []
    for text in metadata.distribution(name).requires or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
            wanted.append(req)
    return wanted


def closure_problems(lock: dict[str, str], roots: list[str]) -> list[str]:
    """Requirements reachable from `roots` (with the extras asked of each) that the lock lacks or
    pins at a version outside their specifier."""
    problems = []
    seen: set[tuple[str, frozenset[str]]] = set()
    pending = [(Requirement(r), "pyproject.toml") for r in roots]
    while pending:
        req, asker = pending.pop()
        name = canonicalize_name(req.name)
        if name not in lock:
            problems.append(f"{asker} needs {req}, which the lock lacks")
            continue
        if not req.specifier.contains(lock[name], prereleases=True):
            problems.append(f"{asker} needs {req}, the lock pins {lock[name]}")
        key = (name, frozenset(req.extras))
        if key not in seen:
            seen.add(key)
            pending += [(dep, f"{name}=={lock[name]}") for dep in requirements_of(name, set(req.extras))]
    return problems


@pytest.fixture(scope="module")
def runtime() -> dict[str, str]:
    return pins_here(LOCKS / "runtime.txt")


@pytest.fixture(scope="module")
def dev() -> dict[str, str]:
    return pins_here(LOCKS / "dev.txt")


def test_the_venv_is_installed_from_the_dev_lock(dev):
    """What this suite runs on is what the lock says (`make` installs it); the closure tests below
    read each locked distribution's requirements from it."""
    installed = {name: metadata.version(name).split("+")[0] for name in dev}
    wrong = {n: (installed[n], v) for n, v in dev.items() if installed[n] != v}
    assert not wrong, f"installed != locked (run `make`, which reinstalls from locks/dev.txt): {wrong}"


def test_runtime_lock_is_closed_under_the_runtime_requirements(runtime):
    roots = [*PYPROJECT["project"]["dependencies"], *PYPROJECT["build-system"]["requires"]]
    assert closure_problems(runtime, roots) == []
    assert {"nvidia-cufft", "nvidia-curand", "nvidia-cusolver"} <= set(runtime)  # torch's cuda-toolkit[...] extras


def test_dev_lock_is_closed_under_the_dev_requirements(dev):
    extras = PYPROJECT["project"]["optional-dependencies"]
    roots = [*PYPROJECT["project"]["dependencies"], *PYPROJECT["build-system"]["requires"]]
    roots += [r for e in DEV_EXTRAS for r in extras[e]]
    assert closure_problems(dev, roots) == []
    assert set(extras) == set(DEV_EXTRAS), "an extra the dev venv does not install is never tested"


def test_a_dropped_pin_or_a_wrong_version_is_caught(runtime):
    roots = PYPROJECT["project"]["dependencies"]
    dropped = {n: v for n, v in runtime.items() if n != "jmespath"}  # boto3's, not erw's own
    assert {p.split(" needs ")[0] for p in closure_problems(dropped, roots)} == {
        f"boto3=={runtime['boto3']}",
        f"botocore=={runtime['botocore']}",
    }
    old = {**runtime, "pillow": "9.0.0"}
    assert any(p.startswith("pyproject.toml needs pillow>=10") for p in closure_problems(old, roots))


def test_the_image_ships_what_the_venv_tests():
    """Every runtime pin is in the dev lock with the same version and hashes (its marker may be
    wider there: a dev tool may need on every platform what erw needs on some)."""
    dev = {(p.name, p.version): p.hashes for p in read_lock((LOCKS / "dev.txt").read_text())}
    for pin in read_lock((LOCKS / "runtime.txt").read_text()):
        assert dev.get((pin.name, pin.version)) == pin.hashes, (
            f"{pin.name}=={pin.version}: not in locks/dev.txt as in runtime.txt"
        )


def test_every_pin_is_exact_and_hashed():
    for name in ("runtime.txt", "dev.txt"):
        pins = read_lock((LOCKS / name).read_text())
        assert pins and all(p.hashes and all(h.startswith("sha256:") for h in p.hashes) for p in pins), name


def test_the_image_filter_leaves_torch_to_the_cuda_index():
    """For CUDA builds other than the lock's, the Dockerfile strips the CUDA-built distributions
    from the lock with one awk program and installs torch from PyTorch's index for that CUDA."""
    dockerfile = (REPO / "Dockerfile").read_text()
    program = dockerfile.split("awk '", 1)[1].split("'", 1)[0]
    kept = subprocess.run(
        ["awk", program, str(LOCKS / "runtime.txt")], capture_output=True, text=True, check=True
    ).stdout
    names = {p.name for p in read_lock(kept)}
    everything = {p.name for p in read_lock((LOCKS / "runtime.txt").read_text())}
    cuda_built = everything - names
    assert {"torch", "torchvision", "triton", "nvidia-cublas", "cuda-toolkit"} <= cuda_built
    assert all(n in {"torch", "torchvision", "triton"} or n.startswith(("nvidia-", "cuda-")) for n in cuda_built)
    assert {"torch-fidelity", "numpy", "boto3"} <= names  # torch-fidelity is not torch
