"""Training and batch-step metrics, read back through a real Prometheus's HTTP API."""

from __future__ import annotations

import itertools
import logging
import math
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from erw.telemetry import PUSHED_METRICS, MetricsError, TrainingMetrics, push_metrics
from tests.prometheus import free_port, free_port_range, require_binary

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BIN = Path(sys.executable).parent


def one_value(result: list[dict]) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def drive(metrics: TrainingMetrics, steps: range, loss: float) -> None:
    for step in steps:
        metrics.observe_step(
            step=step,
            samples=8,
            losses={"loss": loss, "loss_denoising": loss - 0.1},
            align_weight=0.5,
            lr=1e-4,
            grad_norm=0.7,
            step_seconds=0.2,
            data_wait_seconds=0.05,
        )


def test_port_zero_is_a_no_op():
    metrics = TrainingMetrics(0, "run", "train", rank=0, local_rank=0)
    drive(metrics, range(1, 3), 1.0)
    metrics.observe_nonfinite()
    metrics.observe_checkpoint(1.0, ok=True)
    metrics.observe_restart()
    metrics.observe_memory("cpu")
    metrics.close()
    assert not metrics.enabled


def test_taken_port_is_a_clear_error():
    base = free_port_range(2)
    first = TrainingMetrics(base, "run", "train", rank=1, local_rank=1, addr="127.0.0.1")
    try:
        with pytest.raises(MetricsError, match=f"port {base + 1} .*metrics.port={base} \\+ local rank 1"):
            TrainingMetrics(base, "run", "train", rank=1, local_rank=1, addr="127.0.0.1")
    finally:
        first.close()


def test_exposition_passes_promtool_lint():
    promtool = require_binary("promtool")
    port = free_port()
    metrics = TrainingMetrics(port, "lint", "train", rank=0, local_rank=0, checkpoint_every=100, addr="127.0.0.1")
    try:
        drive(metrics, range(1, 4), 1.0)
        metrics.observe_checkpoint(2.0, ok=True)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    finally:
        metrics.close()
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
    assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()


def test_training_metrics_scraped_by_prometheus(prometheus_stack):
    base = free_port_range(2)
    ranks = [
        TrainingMetrics(base, "exporter-test", "warmup", rank=r, local_rank=r, checkpoint_every=50, addr="127.0.0.1")
        for r in range(2)
    ]
    try:
        for r, metrics in enumerate(ranks):
            drive(metrics, range(1, 11 + r), loss=1.5 + r)
            metrics.observe_checkpoint(3.0, ok=True)
            metrics.observe_nonfinite()
        prometheus_stack.scrape("exporter-test", [f"127.0.0.1:{base + r}" for r in range(2)])
        selector = '{run_id="exporter-test", phase="warmup"}'
        steps = prometheus_stack.wait_for(f"erw_steps_total{selector}", lambda r: len(r) == 2)
        assert {s["metric"]["rank"]: float(s["value"][1]) for s in steps} == {"0": 10.0, "1": 11.0}
        loss = prometheus_stack.query('erw_loss{run_id="exporter-test", rank="1", term="loss"}')
        assert one_value(loss) == pytest.approx(2.5)
        assert one_value(prometheus_stack.query('erw_step{run_id="exporter-test", rank="1"}')) == 11
        samples = prometheus_stack.query(f"sum(erw_samples_total{selector})")
        assert one_value(samples) == 8 * (10 + 11)
        assert one_value(prometheus_stack.query('erw_samples_per_second{run_id="exporter-test", rank="0"}')) == 40
        assert one_value(prometheus_stack.query(f"sum(erw_nonfinite_steps_total{selector})")) == 2
        overdue = prometheus_stack.query(
            f"erw_step{selector} - erw_checkpoint_last_success_step{selector} > 2 * erw_checkpoint_interval_steps{selector}"
        )
        assert overdue == []
    finally:
        for metrics in ranks:
            metrics.close()


def test_pushed_metrics_scraped_by_prometheus(prometheus_stack):
    values = {"erw_eval_fid": 12.5, "erw_eval_inception_score": 40.0, "erw_eval_samples": 1000}
    push_metrics(prometheus_stack.pushgateway, "erw-evaluate", "push-test", values)
    push_metrics(
        prometheus_stack.pushgateway,
        "erw-precompute",
        "push-test",
        {"erw_precompute_images_total": 96, "erw_precompute_failed_images_total": 2},
        labels={"worker": "1"},
    )
    fid = prometheus_stack.wait_for('erw_eval_fid{run_id="push-test"}')
    assert one_value(fid) == 12.5
    assert fid[0]["metric"]["job"] == "erw-evaluate"  # honor_labels kept the pushed job label
    images = prometheus_stack.wait_for('erw_precompute_images_total{run_id="push-test", worker="1"}')
    assert one_value(images) == 96
    assert images[0]["metric"]["job"] == "erw-precompute"


def test_push_failure_is_only_a_warning(caplog):
    dead = f"127.0.0.1:{free_port()}"  # nothing listens here
    with caplog.at_level(logging.WARNING, logger="erw.telemetry"):
        push_metrics(dead, "erw-sample", "run", {"erw_sample_images_total": 4})
    assert "could not push erw-sample metrics" in caplog.text


def test_push_rejects_unknown_metric_names():
    with pytest.raises(ValueError, match="erw_eval_fdi"):
        push_metrics("", "erw-evaluate", "run", {"erw_eval_fdi": 1.0})
    assert all(name.startswith("erw_") for name in PUSHED_METRICS)


class NanBatches:
    """Tiny 16x16 batches (the demo config's resolution); the ones at `nan_at` (and every one from `nan_from`) hold a NaN."""

    def __init__(self, nan_at: set[int], nan_from: int):
        self.nan_at, self.nan_from = nan_at, nan_from

    def __iter__(self):
        import torch

        for position in itertools.count():
            g = torch.Generator().manual_seed(position)
            latent = torch.randn(4, 3, 16, 16, generator=g)
            if position in self.nan_at or position >= self.nan_from:
                latent[0, 0, 0, 0] = float("nan")
            yield {"latent": latent, "label": torch.randint(0, 10, (4,), generator=g)}


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(prometheus_stack, tmp_path):
    import torch

    from erw.config import load_config
    from erw.training.distributed import Dist
    from erw.training.trainer import TrainingDiverged, run

    cfg = load_config(
        CONFIGS / "demo.yaml",
        [
            "encoder.name=none",
            "model.depth=2",
            "model.hidden_size=32",
            "model.num_heads=2",
            "model.l2r_depth=1",
            "model.align_depth=1",
            "train.batch_size=4",
            "train.steps=50",
            "train.max_nonfinite=3",
            "train.ckpt_every=1000",
            f"train.out={tmp_path}/train",
            "run_id=nonfinite-test",
        ],
    )
    port = free_port()
    metrics = TrainingMetrics(port, cfg.run_id, "train", rank=0, local_rank=0, addr="127.0.0.1")
    cpu = Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    try:
        # Batches 2 and 3 are bad (two skips, below the limit: the run goes on); from batch 8 all
        # are bad, so steps 7.. are skipped until three in a row stop the run.
        with pytest.raises(TrainingDiverged, match="3 non-finite steps in a row"):
            run(cfg, "train", NanBatches(nan_at={2, 3}, nan_from=8), cpu, metrics=metrics, log=lambda _: None)
        prometheus_stack.scrape("nonfinite-test", [f"127.0.0.1:{port}"])
        selector = '{run_id="nonfinite-test", phase="train", rank="0"}'
        skipped = prometheus_stack.wait_for(f"erw_nonfinite_steps_total{selector}")
        assert one_value(skipped) == 2 + 3
        assert one_value(prometheus_stack.query(f"erw_steps_total{selector}")) == 6
        assert one_value(prometheus_stack.query(f"erw_step{selector}")) == 6
        loss = one_value(prometheus_stack.query('erw_loss{run_id="nonfinite-test", term="loss"}'))
        assert math.isfinite(loss)  # skipped steps never reach the exported loss
    finally:
        metrics.close()


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("digits")
    for args in (
        ["data", "digits", "--out", "digits"],
        [
            "precompute",
            "--no-progress",
            "data.source=digits",
            "data.shards=shards",
            "data.resolution=16",
            "data.codec=identity",
            "precompute.shard_size=500",
        ],
        ["precompute", "--merge", "data.shards=shards"],
    ):
        subprocess.run([str(BIN / "erw"), *args], cwd=work, check=True, capture_output=True, timeout=300)
    return work / "shards"


@pytest.mark.slow  # about 90 s on a loaded 2-core machine, most of it building the digit shards
def test_torchrun_training_is_scraped_with_run_phase_rank_labels(prometheus_stack, digit_shards, tmp_path):
    """Two gloo ranks of `erw train`, each serving metrics.port + local rank, read back through
    Prometheus while the run goes on (it is long on purpose and stopped once read)."""
    base = free_port_range(2)
    run_id = "torchrun-metrics-test"
    command = [
        str(BIN / "torchrun"),
        "--nproc-per-node",
        "2",
        "--no-python",
        str(BIN / "erw"),
        "train",
        "--config",
        str(CONFIGS / "demo.yaml"),
        f"data.shards={digit_shards}",
        "data.num_workers=1",
        "encoder.name=none",
        "model.depth=2",
        "model.hidden_size=32",
        "model.num_heads=2",
        "model.l2r_depth=1",
        "model.align_depth=1",
        "train.batch_size=8",
        "train.steps=100000",
        "train.ckpt_every=100000",
        "train.out=out/train",
        f"metrics.port={base}",
        f"run_id={run_id}",
    ]
    process = subprocess.Popen(
        command,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        prometheus_stack.scrape("torchrun-test", [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"])
        selector = f'{{run_id="{run_id}", phase="train"}}'
        try:
            steps = prometheus_stack.wait_for(f"erw_steps_total{selector} >= 2", lambda r: len(r) == 2, timeout=120)
        except AssertionError:
            os.killpg(process.pid, signal.SIGKILL)  # torchrun, its ranks and their loader workers
            raise AssertionError(f"no metrics from the run; its output:\n{process.communicate()[0][-4000:]}") from None
        assert sorted(s["metric"]["rank"] for s in steps) == ["0", "1"]
        loss = prometheus_stack.query(f'erw_loss{{run_id="{run_id}", phase="train", term="loss"}}')
        assert sorted(s["metric"]["rank"] for s in loss) == ["0", "1"]
        assert all(math.isfinite(float(s["value"][1])) for s in loss)
        # Both ranks take every step together; samples are per rank (4 each of a batch of 8).
        per_step = prometheus_stack.query(f"erw_samples_total{selector} / erw_steps_total{selector}")
        assert sorted(float(s["value"][1]) for s in per_step) == [4.0, 4.0], (
            "erw_samples_total must count the samples of this rank (micro-batch x grad_accum), "
            f"not the global batch: {per_step}"
        )
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()


def test_precompute_and_promote_push_their_results(prometheus_stack, tmp_path):
    """The batch steps' own CLIs push through the real Pushgateway; Prometheus reads them back."""
    import json

    from PIL import Image

    from erw.cli import main

    for cls in ("a", "b"):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (40 * i, 80, 120)).save(tmp_path / "images" / cls / f"{i}.png")
    (tmp_path / "images" / "a" / "broken.png").write_bytes(b"not an image")
    gateway = prometheus_stack.pushgateway
    assert (
        main(
            [
                "precompute",
                "--no-progress",
                "--pushgateway",
                gateway,
                "--run-id",
                "batch-push",
                f"data.source={tmp_path / 'images'}",
                f"data.shards={tmp_path / 'shards'}",
                "data.resolution=16",
                "data.codec=identity",
            ]
        )
        == 0
    )
    (tmp_path / "metrics.json").write_text(json.dumps({"fid": 12.5}))
    assert (
        main(
            [
                "promote",
                "--checkpoint",
                "ckpt",
                "--metrics",
                str(tmp_path / "metrics.json"),
                "--registry",
                str(tmp_path / "registry.json"),
                "--run-id",
                "batch-push",
                "--pushgateway",
                gateway,
            ]
        )
        == 0
    )
    images = prometheus_stack.wait_for('erw_precompute_images_total{run_id="batch-push", worker="0"}')
    assert one_value(images) == 6
    assert one_value(prometheus_stack.query('erw_precompute_failed_images_total{run_id="batch-push"}')) == 1
    assert one_value(prometheus_stack.wait_for('erw_promote_decision{run_id="batch-push"}')) == 1
    assert one_value(prometheus_stack.query('erw_promote_candidate_fid{run_id="batch-push"}')) == 12.5


def test_pipeline_promote_step_pushes_its_decision(prometheus_stack, tmp_path, monkeypatch):
    """The pipeline's promote step, run by kfp.local from its shipped source, pushes the gate's
    decision to the Pushgateway that overrides=[metrics.pushgateway=...] names, labelled with the run."""
    import json

    from kfp import local

    from components.promote import promote
    from pipeline.params import REPO
    from tests.test_promote import metrics

    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"), raise_on_error=True)
    config, overrides = str(REPO / "configs/demo.yaml"), [f"metrics.pushgateway={prometheus_stack.pushgateway}"]

    def step(run_id: str, fid: float, *settings: str) -> bool:
        evaluation = tmp_path / "eval" / run_id
        evaluation.mkdir(parents=True)
        (evaluation / "metrics.json").write_text(json.dumps(metrics(fid)))
        task = promote(
            checkpoint=f"/train/{run_id}/step-00000100",
            evaluation=str(evaluation),
            config=config,
            overrides=[*overrides, *settings],
            workspace=str(tmp_path / "ws"),
            registry="",
            run_id=run_id,
        )
        return task.outputs["Output"]

    assert step("promote-first", 20.0) is True  # an empty registry: published
    assert step("promote-second", 19.95) is False  # better, but by less than the default margin
    assert step("promote-third", 19.95, "promote.margin=0.01") is True  # the config's margin is the gate's
    first = prometheus_stack.wait_for('erw_promote_decision{run_id="promote-first"}')
    assert one_value(first) == 1 and first[0]["metric"]["job"] == "erw-promote"
    assert one_value(prometheus_stack.query('erw_promote_candidate_fid{run_id="promote-first"}')) == 20.0
    assert math.isnan(one_value(prometheus_stack.query('erw_promote_current_fid{run_id="promote-first"}')))
    assert one_value(prometheus_stack.wait_for('erw_promote_decision{run_id="promote-second"}')) == 0
    assert one_value(prometheus_stack.query('erw_promote_candidate_fid{run_id="promote-second"}')) == 19.95
    assert one_value(prometheus_stack.query('erw_promote_current_fid{run_id="promote-second"}')) == 20.0
