"""`erw sample` and `erw evaluate` end to end on a tiny checkpoint, and their error messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from erw.cli import main
from erw.config import config_from_dict
from erw.evaluation.features import save_feature_network
from erw.models.sit import sit_from_config
from erw.training.checkpoint import save_checkpoint
from tests.random_weights import save_random_inception_weights

NUM_CLASSES, RESOLUTION = 3, 8


def _config():
    return config_from_dict(
        {
            "run_id": "tiny",
            "seed": 5,
            "model": {
                "arch": "SiT-S/2",
                "depth": 2,
                "hidden_size": 32,
                "num_heads": 2,
                "num_classes": NUM_CLASSES,
                "projector_dim": 16,
                "align_depth": 1,
                "l2r_depth": 1,
            },
            "data": {"resolution": RESOLUTION, "codec": "identity"},
            "sample": {"mode": "sde", "steps": 3, "num_samples": 12, "batch_size": 5},
        }
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A tiny phase-2 checkpoint (random weights, projector included) saved the way training saves it."""
    cfg = _config()
    torch.manual_seed(0)
    model = sit_from_config(cfg.model, RESOLUTION, 3, encoder_dim=8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = model.state_dict()
    out = tmp_path_factory.mktemp("run")
    return save_checkpoint(
        str(out),
        step=7,
        phase="train",
        config=cfg,
        model_state=state,
        ema_state={k: v.clone() for k, v in state.items()},
        train_state={"step": 7},
    )


class _TinyFeatures(torch.nn.Module):
    """A stand-in feature network with logits: colour statistics through a fixed random projection."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(6, 4)

    def forward(self, images):
        x = images.float() / 255.0
        features = torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1)
        return features, self.head(features)


@pytest.fixture(scope="module")
def feature_network(tmp_path_factory) -> str:
    torch.manual_seed(1)
    path = str(tmp_path_factory.mktemp("fn") / "features.pt2")
    save_feature_network(_TinyFeatures(), path, RESOLUTION)
    return path


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("inception") / "inception.pth")
    save_random_inception_weights(path)
    return path


def _images(n: int, seed: int, size: int = RESOLUTION) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def _run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def samples(checkpoint, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("samples")
    assert (
        main(["sample", "--ckpt", checkpoint, "--out", str(out), "--cfg-scale", "2", "--guidance-high", "0.7", "--npz"])
        == 0
    )
    return str(out)


def test_sample_writes_shards_manifest_and_npz(samples, checkpoint):
    manifest = json.loads(Path(samples, "manifest.json").read_text())
    assert manifest["format"] == "erw-samples" and manifest["num_samples"] == 12
    assert [s["name"] for s in manifest["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [s["count"] for s in manifest["shards"]] == [5, 5, 2]
    assert manifest["checkpoint"] == checkpoint and manifest["step"] == 7 and manifest["run_id"] == "tiny"
    assert manifest["settings"]["cfg_scale"] == 2.0 and manifest["settings"]["steps"] == 3  # flag, then checkpoint
    with np.load(Path(samples, "samples.npz")) as npz:
        assert npz["arr_0"].shape == (12, RESOLUTION, RESOLUTION, 3) and npz["arr_0"].dtype == np.uint8
        assert npz["arr_1"].tolist() == [i % NUM_CLASSES for i in range(12)]
        assert len({image.tobytes() for image in npz["arr_0"]}) == 12


def test_sample_resumes_only_missing_batches(samples, checkpoint, tmp_path):
    out = tmp_path / "again"
    argv = ["sample", "--ckpt", checkpoint, "--out", str(out), "--cfg-scale", "2", "--guidance-high", "0.7"]
    assert main(argv) == 0
    (out / "shard-000001.tar").unlink()
    (out / "_progress" / "shard-000001.json").unlink()
    untouched = (out / "shard-000000.tar").stat().st_mtime_ns
    assert main(argv) == 0
    assert (out / "shard-000000.tar").stat().st_mtime_ns == untouched
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar"):  # same seed: same bytes
        assert (out / name).read_bytes() == Path(samples, name).read_bytes()


def test_sample_then_evaluate_with_a_feature_network(samples, feature_network, tmp_path, capsys):
    reference = _npz(tmp_path / "ref.npz", arr_0=_images(20, seed=3))
    out = tmp_path / "eval"
    code, err = _run(
        capsys,
        "evaluate",
        "--samples",
        samples,
        "--reference",
        reference,
        "--out",
        out,
        "--feature-network",
        feature_network,
        "--grid-per-class",
        4,
    )
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fid"] > 0 and np.isfinite(metrics["fid"])
    assert metrics["sfid"] is None  # custom networks have no spatial features
    assert 1.0 <= metrics["inception_score"] <= 4.0  # 4 logits
    assert 0.0 <= metrics["precision"] <= 1.0 and 0.0 <= metrics["recall"] <= 1.0
    assert metrics["num_samples"] == 12 and metrics["num_reference"] == 20
    assert metrics["sampling"]["step"] == 7 and metrics["feature_network"].startswith("custom:")
    assert 0.0 <= metrics["class_accuracy"] <= 1.0  # the feature network classifies the samples' own labels
    grid = np.asarray(Image.open(out / "grid.png"))
    pad = 2
    assert grid.shape == (NUM_CLASSES * (RESOLUTION + pad) + pad, 4 * (RESOLUTION + pad) + pad, 3)
    summary = (out / "summary.md").read_text()
    assert "| FID |" in summary and "grid.png" in summary
    assert "<img src='data:image/png;base64," in (out / "summary.html").read_text()


def test_identical_samples_and_reference_score_perfectly(samples, feature_network, tmp_path, capsys):
    out = tmp_path / "eval"
    code, err = _run(
        capsys,
        "evaluate",
        "--samples",
        Path(samples, "samples.npz"),
        "--reference",
        Path(samples, "samples.npz"),
        "--out",
        out,
        "--feature-network",
        feature_network,
    )
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fid"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["precision"] == metrics["recall"] == 1.0


@pytest.mark.slow  # two eigendecompositions of ~2048x2048 matrices: seconds on a free CPU, minutes on a busy one
def test_evaluate_with_inception_features(samples, inception_weights, tmp_path, capsys):
    """FID, sFID, IS and precision/recall through the Inception with random weights of the real architecture."""
    reference = _npz(tmp_path / "ref.npz", arr_0=_images(8, seed=4))
    out = tmp_path / "eval"
    code, err = _run(
        capsys,
        "evaluate",
        "--samples",
        Path(samples, "samples.npz"),
        "--reference",
        reference,
        "--out",
        out,
        "--inception-weights",
        inception_weights,
        "--num-samples",
        8,
    )
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 8 and metrics["feature_network"].startswith("inception-v3-tf:")
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert metrics[key] is not None and np.isfinite(metrics[key]), key
    assert metrics["class_accuracy"] is None  # Inception's classes are not the dataset's
    assert metrics["fid"] > 0 and metrics["sfid"] > 0


def test_inception_spatial_features_are_mixed_6_conv_in_tf_order(inception_weights):
    from erw.evaluation.inception import SPATIAL_DIM, load_inception

    net = load_inception(inception_weights)
    seen = {}
    net.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.setdefault("map", o))
    images = torch.from_numpy(_images(2, seed=5, size=16)).permute(0, 3, 1, 2)
    out = net(images)
    assert (
        out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008) and out["spatial"].shape == (2, SPATIAL_DIM)
    )
    expected = seen["map"][:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # [N, 17, 17, 7] flattened, as ADM
    torch.testing.assert_close(out["spatial"], expected)


def test_reference_from_a_dataset_is_computed_once_and_cached(samples, feature_network, tmp_path, capsys):
    cache = tmp_path / "cache.npz"
    argv = [
        "evaluate",
        "--samples",
        samples,
        "--reference",
        samples,
        "--feature-network",
        feature_network,
        "--reference-cache",
        cache,
    ]
    assert _run(capsys, *argv, "--out", tmp_path / "a")[0] == 0
    assert cache.exists()
    cache_time = cache.stat().st_mtime_ns
    assert _run(capsys, *argv, "--out", tmp_path / "b")[0] == 0
    assert cache.stat().st_mtime_ns == cache_time
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert a["fid"] == b["fid"] == pytest.approx(0.0, abs=1e-6)
    assert a["num_reference"] == 12
    # Another reference limit is another reference: the cache is recomputed, not reused.
    assert _run(capsys, *argv, "--out", tmp_path / "c", "--reference-limit", 6)[0] == 0
    assert cache.stat().st_mtime_ns != cache_time
    c = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert c["num_reference"] == 6 and c["fid"] > 0


# ---------------------------------------------------------------------------------------------
# One clear message per problem, exit code 2, no traceback.


def test_missing_reference_is_reported(samples, feature_network, tmp_path, capsys):
    code, err = _run(
        capsys,
        "evaluate",
        "--samples",
        samples,
        "--reference",
        tmp_path / "nope.npz",
        "--out",
        tmp_path / "e",
        "--feature-network",
        feature_network,
    )
    assert code == 2 and "nope.npz does not exist" in err and "Traceback" not in err


def test_unfinished_samples_are_reported(feature_network, tmp_path, capsys):
    (tmp_path / "samples").mkdir()
    code, err = _run(
        capsys,
        "evaluate",
        "--samples",
        tmp_path / "samples",
        "--reference",
        tmp_path / "r.npz",
        "--out",
        tmp_path / "e",
        "--feature-network",
        feature_network,
    )
    assert code == 2 and "has no manifest.json: give the --out of a finished `erw sample`" in err


def test_wrong_shape_reference_is_reported(samples, inception_weights, tmp_path, capsys):
    reference = _npz(tmp_path / "ref.npz", mu=np.zeros(64), sigma=np.eye(64))
    code, err = _run(
        capsys,
        "evaluate",
        "--samples",
        samples,
        "--reference",
        reference,
        "--out",
        tmp_path / "e",
        "--inception-weights",
        inception_weights,
    )
    assert code == 2
    assert "does not fit the inception-v3-tf features" in err and "should be [2048]" in err


def test_reference_without_statistics_or_images_is_reported(samples, feature_network, tmp_path, capsys):
    reference = _npz(tmp_path / "ref.npz", labels=np.arange(3))
    code, err = _run(
        capsys,
        "evaluate",
        "--samples",
        samples,
        "--reference",
        reference,
        "--out",
        tmp_path / "e",
        "--feature-network",
        feature_network,
    )
    assert code == 2 and "holds labels: expected mu and sigma" in err


def test_reference_images_of_the_wrong_layout_are_reported(samples, feature_network, tmp_path, capsys):
    reference = _npz(tmp_path / "ref.npz", arr_0=np.zeros((4, 3, 8, 8), dtype=np.uint8))  # NCHW, not ADM's NHWC
    code, err = _run(
        capsys,
        "evaluate",
        "--samples",
        samples,
        "--reference",
        reference,
        "--out",
        tmp_path / "e",
        "--feature-network",
        feature_network,
    )
    assert code == 2 and "[N, H, W, 3]" in err and "[4, 3, 8, 8]" in err


def test_unreadable_checkpoint_is_reported(tmp_path, capsys):
    code, err = _run(capsys, "sample", "--ckpt", tmp_path / "no-run", "--out", tmp_path / "s")
    assert code == 2 and "no complete checkpoint" in err
    broken = tmp_path / "run" / "step-00000001"
    broken.mkdir(parents=True)
    (broken / "meta.json").write_text("{not json")
    code, err = _run(capsys, "sample", "--ckpt", broken, "--out", tmp_path / "s")
    assert code == 2 and "not valid JSON" in err


def test_class_outside_the_model_is_reported(checkpoint, tmp_path, capsys):
    code, err = _run(capsys, "sample", "--ckpt", checkpoint, "--out", tmp_path / "s", "--classes", "0,3,-1")
    assert code == 2
    assert f"--classes 3, -1 outside the model's classes 0..{NUM_CLASSES - 1}" in err
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_rerun_with_other_settings_is_refused(samples, checkpoint, capsys):
    code, err = _run(capsys, "sample", "--ckpt", checkpoint, "--out", samples, "--cfg-scale", "3")
    assert code == 2 and "already holds samples made with other settings (cfg_scale" in err


@pytest.mark.slow
def test_two_process_torchrun_writes_the_same_samples(checkpoint, samples, tmp_path):
    """A real 2-rank gloo job produces byte-identical shards to the single-process run."""
    out = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "-m",
            "erw.cli",
            "sample",
            "--ckpt",
            checkpoint,
            "--out",
            str(out),
            "--cfg-scale",
            "2",
            "--guidance-high",
            "0.7",
        ],
        check=True,
        env=env,
        timeout=300,
    )
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar"):
        assert (out / name).read_bytes() == Path(samples, name).read_bytes()


def test_sample_and_evaluate_through_s3(checkpoint, feature_network, s3_bucket, capsys):
    from erw import storage

    out = f"{s3_bucket}/samples"
    assert main(["sample", "--ckpt", checkpoint, "--out", out, "--num-samples", "4", "--npz"]) == 0
    code, err = _run(
        capsys,
        "evaluate",
        "--samples",
        out,
        "--reference",
        f"{out}/samples.npz",
        "--out",
        f"{s3_bucket}/eval",
        "--feature-network",
        feature_network,
    )
    assert code == 0, err
    metrics = json.loads(storage.read_bytes(f"{s3_bucket}/eval/metrics.json"))
    assert metrics["num_samples"] == 4 and metrics["fid"] == pytest.approx(0.0, abs=1e-6)
    assert storage.exists(f"{s3_bucket}/eval/grid.png") and storage.exists(f"{s3_bucket}/eval/summary.html")


def test_class_accuracy_counts_samples_classified_as_the_class_asked_for():
    from erw.evaluation.evaluate import class_accuracy
    from erw.evaluation.features import Features

    class Classifier:
        classifies_labels = True

    logits = np.eye(3)[[0, 1, 2, 2]]  # argmax 0, 1, 2, 2
    features = Features(pool=np.zeros((4, 2)), logits=logits, spatial=None)
    assert class_accuracy(features, Classifier(), np.array([0, 1, 2, 0])) == 0.75
    assert class_accuracy(features, Classifier(), np.array([0, 1, 2, -1])) is None  # an unlabelled sample
    assert class_accuracy(features, Classifier(), np.array([0, 1, 2, 3])) is None  # a class the network lacks
    Classifier.classifies_labels = False
    assert class_accuracy(features, Classifier(), np.array([0, 1, 2, 0])) is None
