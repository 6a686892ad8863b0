"""MLflow Model Registry as the gate's registry, and training runs logged to MLflow, against a
real `mlflow server` (SQLite store) started by the test on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from erw.promote import PromoteError, promote_if_better  # noqa: E402
from erw.registry import open_registry  # noqa: E402
from tests.prometheus import free_port  # noqa: E402
from tests.test_promote import metrics  # noqa: E402


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    mlflow = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
    process = subprocess.Popen(
        [
            mlflow,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--default-artifact-root",
            str(root / "artifacts"),
        ],
        stdout=open(root / "server.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", url)
    yield url
    patch.undo()
    os.killpg(process.pid, 15)
    process.wait(timeout=30)


def write(tmp_path: Path, name: str, content: dict) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(content))
    return str(path)


def test_model_versions_metrics_lineage_and_the_champion_alias(mlflow_server, s3_bucket, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient()
    registry = "mlflow:erw-test-model"

    def promote(name: str, fid: float, **changes):
        return promote_if_better(
            f"{s3_bucket}/train/{name}/step-00000100",
            write(tmp_path, name, metrics(fid, **changes)),
            registry,
            run_id=name,
            margin=0.5,
        )

    first = promote("a", 20.0)
    assert first.promoted
    version = client.get_model_version_by_alias("erw-test-model", "champion")
    assert version.version == "1" and version.source == f"{s3_bucket}/train/a/step-00000100"
    assert version.tags["erw.run_id"] == "a" and version.tags["erw.lineage.checkpoint"] == version.source
    assert client.get_run(version.run_id).data.metrics["fid"] == 20.0  # the metrics, comparable in the UI
    assert client.get_run(version.run_id).data.params["number_of_samples"] == "1000"

    worse = promote("b", 19.8)  # better, but not by more than the margin
    assert not worse.promoted
    assert client.get_model_version_by_alias("erw-test-model", "champion").version == "1"
    assert "not more than the margin" in client.get_model_version("erw-test-model", "2").tags["erw.verdict"]

    with pytest.raises(PromoteError, match="sampling steps: 50 for the candidate, 250 for the published model"):
        promote("c", 5.0, steps=50)
    assert client.get_model_version_by_alias("erw-test-model", "champion").version == "1"

    better = promote("d", 15.0)
    assert better.promoted and "alias champion -> version 4" in better.message
    assert client.get_model_version_by_alias("erw-test-model", "champion").version == "4"
    retried = promote("d", 15.0)  # the step retried after it had published
    assert retried.promoted and retried.already
    assert len(client.search_model_versions("name = 'erw-test-model'")) == 4  # no duplicate version

    reg = open_registry(registry)
    assert [e["run_id"] for e in reg.entries()] == ["a", "d"] and reg.published()["metrics"]["fid"] == 15.0


def test_training_runs_log_params_and_loss_curves(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    from tests.test_cli_training import ROOT, TINY, erw

    from tests.images import noise_image_folder

    images = noise_image_folder(tmp_path / "images", count=48, classes=3, size=32)
    erw(
        "precompute",
        "--no-progress",
        f"data.source={images}",
        "data.shards=shards",
        "data.resolution=16",
        "data.codec=identity",
        cwd=tmp_path,
    )
    erw(
        "train",
        "--config",
        str(ROOT / "configs/demo.yaml"),
        "data.shards=shards",
        *TINY,
        "run_id=mlflow-test",
        "encoder.name=none",
        "train.steps=4",
        "train.ckpt_every=4",
        "train.log_every=2",
        "train.out=out",
        cwd=tmp_path,
    )

    client = MlflowClient()
    experiment = client.get_experiment_by_name("erw")
    [run] = client.search_runs([experiment.experiment_id], "tags.`erw.run` = 'mlflow-test/train'")
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "4" and run.data.params["data.shards"] == "shards"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [2, 4] and all(m.value > 0 for m in losses)
