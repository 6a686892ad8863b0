"""The laptop demo (`make demo`): its settings learn the digits, its encoder ships with the
repository, and `erw pipeline run-local` shows steps while the executor dumps go to a log.

No `from __future__ import annotations`: kfp reads the components' annotations as types.
"""

import contextlib
import io
import json
from pathlib import Path

import torch

from erw.cli import main as erw
from erw.config import load_config

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


def test_the_shipped_encoder_is_small_and_loads_as_the_demo_aligns_to_it():
    from erw.models.encoders import load_encoder

    cfg = load_config(DEMO)
    weights = REPO / cfg.encoder.weights
    assert weights.stat().st_size < 2_000_000
    encoder = load_encoder(cfg.encoder, cfg.data.resolution)
    tokens = encoder(torch.zeros(2, 3, cfg.data.resolution, cfg.data.resolution, dtype=torch.uint8))
    # One token per SiT patch: the alignment target lines up with the model's token grid.
    assert tokens.shape[:2] == (2, (cfg.data.resolution // cfg.model.patch_size) ** 2)


def test_the_demo_evaluator_is_made_at_the_demo_resolution():
    from pipeline.params import DEMO_INPUTS

    argv = DEMO_INPUTS[load_config(DEMO).eval.feature_network]
    assert int(argv[argv.index("--resolution") + 1]) == load_config(DEMO).data.resolution


def test_demo_settings_at_reduced_length_generate_the_digit_asked_for(tmp_path):
    """configs/demo.yaml as shipped (model, encoder, guidance), a quarter of its training on one
    process: the generated digits are classified as the class asked for well above chance (10%)."""
    cfg = load_config(DEMO)
    digits, shards, evaluator = tmp_path / "digits", tmp_path / "shards", tmp_path / "evaluator.pt2"
    res = str(cfg.data.resolution)
    assert erw(["data", "digits", "--out", str(digits)]) == 0
    assert (
        erw(["precompute", "--config", str(DEMO), "--no-progress", f"data.source={digits}", f"data.shards={shards}"])
        == 0
    )
    assert erw(["precompute", "--merge", f"data.shards={shards}"]) == 0
    assert (
        erw(
            [
                "fit-evaluator",
                "--images",
                str(digits),
                "--out",
                str(evaluator),
                "--resolution",
                res,
                "--max-shift",
                "1",
                "--steps",
                "200",
            ]
        )
        == 0
    )
    shorter = [
        f"data.source={digits}",
        f"data.shards={shards}",
        "data.num_workers=0",
        f"warmup.out={tmp_path / 'warmup'}",
        "warmup.steps=200",
        f"train.out={tmp_path / 'train'}",
        "train.steps=300",
        "objective.align_half_life=150",
    ]
    assert erw(["warmup", "--config", str(DEMO), *shorter]) == 0
    assert erw(["train", "--config", str(DEMO), *shorter, "--init-from", str(tmp_path / "warmup")]) == 0
    assert (
        erw(["sample", "--ckpt", str(tmp_path / "train"), "--out", str(tmp_path / "samples"), "--num-samples", "100"])
        == 0
    )
    assert (
        erw(
            [
                "evaluate",
                "--samples",
                str(tmp_path / "samples"),
                "--reference",
                str(shards),
                "--feature-network",
                str(evaluator),
                "--out",
                str(tmp_path / "eval"),
            ]
        )
        == 0
    )
    scores = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert scores["class_accuracy"] > 0.2, scores


def test_run_local_console_shows_one_line_per_step_and_logs_the_rest(tmp_path):
    """A two-step pipeline through the real kfp.local runner, inside the demo's console."""
    from kfp import dsl, local

    from pipeline.console import step_console

    @dsl.component(base_image="python:3.11")
    def make(n: int) -> int:
        print(f"wrote {n} samples to somewhere")
        return n * 2

    @dsl.component(base_image="python:3.11")
    def report(n: int) -> int:
        print('{"fid": 3.5, "class_accuracy": 0.925, "num_samples": 200}')
        return n

    @dsl.pipeline
    def two_steps() -> int:
        return report(n=make(n=3).output).output

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    screen, log = io.StringIO(), tmp_path / "run.log"
    with contextlib.redirect_stdout(screen):
        with step_console(log, verbose=False):
            assert two_steps().output == 6
    shown, logged = screen.getvalue(), log.read_text()
    assert f"full log: {log}" in shown
    assert "[1] make" in shown and "wrote 3 samples to somewhere" in shown
    assert "[2] report" in shown and "FID 3.50, class accuracy 92.5% (200 samples)" in shown
    # The executor input/output dumps and the artifact listings are in the log, not on screen.
    assert "executor_input" in logged and "executor_input" not in shown
    assert "finished with status" in logged and "finished with status" not in shown


def test_run_local_console_verbose_shows_everything():
    from pipeline.console import StepConsole

    screen, log = io.StringIO(), io.StringIO()
    console = StepConsole(log, screen, verbose=True)
    console.write("    [KFP Executor] executor_input {...}\n")
    assert screen.getvalue() == log.getvalue() == "    [KFP Executor] executor_input {...}\n"
