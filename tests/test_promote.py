"""The promote gate: like-with-like comparisons, the margin, concurrent runs and retried steps."""

from __future__ import annotations

import copy
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from erw import storage
from erw.cli import main
from erw.evaluation.comparison import evaluation_settings
from erw.promote import PromoteError, promote_if_better
from erw.registry import open_registry
from tests.test_evaluate_cli import checkpoint, feature_network  # noqa: F401  (fixtures: a tiny model, a feature net)

SETTINGS = {
    "num_samples": 1000,
    "batch_size": 50,
    "mode": "sde",
    "solver": "euler",
    "steps": 250,
    "cfg_scale": 1.5,
    "guidance_low": 0.0,
    "guidance_high": 0.7,
    "use_ema": True,
    "seed": 0,
    "path": "linear",
    "classes": [0, 1, 2],
}


def metrics(fid: float, **changes) -> dict:
    """A metrics.json as `erw evaluate` writes it (the fields the gate reads)."""
    top_level = ("num_samples", "feature_network", "reference_sha256")
    sampler = {**SETTINGS, **{k: v for k, v in changes.items() if k not in top_level}}
    top = {k: v for k, v in changes.items() if k in top_level}
    return {
        "fid": fid,
        "sfid": None,
        "num_samples": 1000,
        "feature_network": "inception-v3-compat:abc123",
        "reference_sha256": "f" * 64,
        "sampling": {"checkpoint": "x", "step": 1, "run_id": "r", "settings": sampler},
        **top,
    }


def write(path: str, content: dict) -> str:
    storage.write_bytes(path, json.dumps(content).encode())
    return path


def promote(registry: str, name: str, fid: float, tmp: str, margin: float = 0.5, **changes):
    uri = write(storage.join(tmp, f"{name}.json"), metrics(fid, **changes))
    return promote_if_better(f"/runs/{name}/step-00000100", uri, registry, run_id=name, margin=margin)


@pytest.mark.parametrize(
    "field, value, named",
    [
        ("reference_sha256", "0" * 64, "reference statistics"),
        ("num_samples", 5000, "number of samples"),
        ("feature_network", "custom:0123", "evaluator network"),
        ("mode", "ode", "sampler mode"),
        ("solver", "heun", "ODE solver"),
        ("steps", 50, "sampling steps"),
        ("cfg_scale", 4.0, "CFG scale"),
        ("guidance_low", 0.1, "CFG interval start"),
        ("guidance_high", 1.0, "CFG interval end"),
        ("use_ema", False, "EMA weights"),
        ("classes", [0, 1], "sampled classes"),
    ],
)
def test_mismatched_evaluations_are_refused_and_named(tmp_path, field, value, named):
    registry = str(tmp_path / "registry.json")
    assert promote(registry, "a", 20.0, str(tmp_path)).promoted
    before = Path(registry).read_bytes()
    with pytest.raises(PromoteError, match=rf"(?s)evaluations differ in.*{named}: "):
        promote(registry, "b", 5.0, str(tmp_path), **{field: value})
    assert Path(registry).read_bytes() == before  # a refusal publishes nothing


def test_missing_settings_are_refused_too(tmp_path):
    registry = str(tmp_path / "registry.json")
    assert promote(registry, "a", 20.0, str(tmp_path)).promoted
    old = metrics(5.0)
    del old["reference_sha256"]
    uri = write(str(tmp_path / "old.json"), old)
    with pytest.raises(PromoteError, match="reference statistics: not recorded in the candidate's metrics.json"):
        promote_if_better("/runs/old/step-1", uri, registry)


def test_margin(tmp_path):
    registry = str(tmp_path / "registry.json")
    first = promote(registry, "a", 20.0, str(tmp_path))
    assert first.promoted and "registry was empty" in first.message
    at_margin = promote(registry, "b", 19.5, str(tmp_path))  # better by exactly the margin: noise
    assert not at_margin.promoted and "not more than the margin 0.5" in at_margin.message
    worse = promote(registry, "c", 21.0, str(tmp_path))
    assert not worse.promoted and "not better" in worse.message
    better = promote(registry, "d", 19.4, str(tmp_path))
    assert better.promoted and "better by 0.6 > margin 0.5" in better.message
    assert [e["run_id"] for e in open_registry(registry).entries()] == ["a", "d"]
    assert not promote(registry, "e", 19.0, str(tmp_path), margin=1.0).promoted
    assert promote(registry, "f", 19.0, str(tmp_path), margin=0.0).promoted


def test_a_retried_promote_reports_the_truth(tmp_path):
    registry = str(tmp_path / "registry.json")
    assert promote(registry, "a", 20.0, str(tmp_path)).promoted
    assert promote(registry, "b", 10.0, str(tmp_path)).promoted
    before = Path(registry).read_bytes()
    retried = promote(registry, "b", 10.0, str(tmp_path))  # the step ran again after writing
    assert retried.promoted and retried.already and "already published" in retried.message
    assert Path(registry).read_bytes() == before
    assert promote(registry, "c", 5.0, str(tmp_path)).promoted
    late = promote(registry, "b", 10.0, str(tmp_path))
    assert late.promoted and late.already and "since replaced by /runs/c/" in late.message


@pytest.fixture
def atomic_moto_puts():
    """moto checks If-Match/If-None-Match and then stores, in two steps, while its server runs a
    thread per request; S3 itself evaluates the condition atomically with the write. Serialise
    moto's PutObject handler so the fake gives the guarantee the real service gives."""
    from moto.s3.responses import S3Response

    real = S3Response.put_object
    lock = threading.Lock()

    def put_object(self, *args, **kwargs):
        with lock:
            return real(self, *args, **kwargs)

    S3Response.put_object = put_object
    yield
    S3Response.put_object = real


_race: dict = {}  # what the racing promotes share (inherited by forked processes)


def _racing_promote(i: int):
    root, registry, fids = _race["root"], _race["registry"], _race["fids"]
    uri = write(storage.join(root, f"m{i}.json"), metrics(fids[i]))
    _race["start"].wait()
    return promote_if_better(f"ckpt-{i}", uri, registry, run_id=f"r{i}")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_promotes_never_lose_an_update(where, tmp_path, request):
    """12 runs promote at once: threads against moto, forked processes on a local file (in one
    process the GIL would serialise the local reads and writes and hide a race)."""
    import multiprocessing

    if where == "s3":
        request.getfixturevalue("atomic_moto_puts")
        root = request.getfixturevalue("s3_bucket")
    else:
        root = str(tmp_path)
    fids = [50.0 - 2 * i for i in range(12)]  # every one beats all those before it by more than the margin
    np.random.default_rng(0).shuffle(fids)
    fork = multiprocessing.get_context("fork")
    _race.update(
        root=root,
        registry=storage.join(root, "registry.json"),
        fids=fids,
        start=threading.Barrier(len(fids)) if where == "s3" else fork.Barrier(len(fids)),
    )
    if where == "s3":
        with ThreadPoolExecutor(len(fids)) as pool:
            decisions = list(pool.map(_racing_promote, range(len(fids))))
    else:
        with fork.Pool(len(fids)) as pool:
            decisions = pool.map(_racing_promote, range(len(fids)))
    registry = open_registry(_race["registry"])
    history = registry.entries()
    published = [e["checkpoint"] for e in history]
    # Every run told "promoted" is in the history; the history improves monotonically; the
    # best candidate is published; nobody's decision was made against a stale registry.
    assert sorted(published) == sorted(d.candidate["checkpoint"] for d in decisions if d.promoted)
    values = [e["metrics"]["fid"] for e in history]
    assert values == sorted(values, reverse=True) and len(set(values)) == len(values)
    assert registry.published()["metrics"]["fid"] == min(fids)
    for d in decisions:
        if d.promoted and d.previous is not None:
            assert published.index(d.candidate["checkpoint"]) == published.index(d.previous["checkpoint"]) + 1


def test_gate_on_real_evaluations(checkpoint, feature_network, tmp_path, capsys):  # noqa: F811
    """`erw sample` + `erw evaluate` record what the gate compares; another sampling seed is
    comparable, other steps or another reference are refused."""
    rng = np.random.default_rng(3)
    ref_a, ref_b = tmp_path / "ref_a.npz", tmp_path / "ref_b.npz"
    np.savez(ref_a, arr_0=rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8))
    np.savez(ref_b, arr_0=rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8))

    def evaluated(name: str, reference: Path, *sample_args: str) -> str:
        samples, out = tmp_path / f"s-{name}", tmp_path / f"e-{name}"
        assert main(["sample", "--ckpt", checkpoint, "--out", str(samples), *sample_args]) == 0
        assert (
            main(
                [
                    "evaluate",
                    "--samples",
                    str(samples),
                    "--reference",
                    str(reference),
                    "--out",
                    str(out),
                    "--feature-network",
                    feature_network,
                ]
            )
            == 0
        )
        return str(out / "metrics.json")

    base = evaluated("base", ref_a, "--seed", "1")
    settings = evaluation_settings(json.loads(Path(base).read_text()))
    assert None not in settings.values(), settings
    registry = str(tmp_path / "registry.json")
    assert main(["promote", "--checkpoint", "ckpt-base", "--metrics", base, "--registry", registry]) == 0
    assert (
        main(
            [
                "promote",
                "--checkpoint",
                "ckpt-seed",
                "--registry",
                registry,
                "--metrics",
                evaluated("seed", ref_a, "--seed", "2"),
                "--margin",
                "1e9",
            ]
        )
        == 0
    )
    assert "not more than the margin" in capsys.readouterr().out
    assert (
        main(
            [
                "promote",
                "--checkpoint",
                "ckpt-steps",
                "--registry",
                registry,
                "--metrics",
                evaluated("steps", ref_a, "--seed", "1", "--steps", "2"),
            ]
        )
        == 2
    )
    assert "sampling steps: 2 for the candidate, 3 for the published model" in capsys.readouterr().err
    assert (
        main(
            [
                "promote",
                "--checkpoint",
                "ckpt-ref",
                "--registry",
                registry,
                "--metrics",
                evaluated("ref", ref_b, "--seed", "1"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "reference statistics:" in err and "sampling steps" not in err
    assert [e["checkpoint"] for e in open_registry(registry).entries()] == ["ckpt-base"]
    entry = open_registry(registry).published()
    assert entry["lineage"]["checkpoint"] == "ckpt-base" and copy.deepcopy(entry["metrics"]) == json.loads(
        Path(base).read_text()
    )
