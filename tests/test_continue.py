"""Continue mode: `erw train --init-from PUBLISHED_PHASE2_CKPT` starts from its weights, EMA and
AdamW moments for train.steps more steps, records where it started, and refuses another model."""

from __future__ import annotations

import pytest
import torch

from erw.training import checkpoint as ckpt
from erw.config import load_config
from tests.images import noise_image_folder
from tests.test_cli_training import ROOT, TINY, erw

COMMON = [
    "--config",
    str(ROOT / "configs/demo.yaml"),
    "data.shards=shards",
    *TINY,
    "encoder.name=none",
    "data.num_workers=0",
    "train.log_every=1",
]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A small dataset and a finished phase-2 run on it (what the registry would publish)."""
    work = tmp_path_factory.mktemp("continue")
    noise_image_folder(work / "images", count=48, classes=3, size=32)
    erw(
        "precompute",
        "--no-progress",
        "data.source=images",
        "data.shards=shards",
        "data.resolution=16",
        "data.codec=identity",
        cwd=work,
    )
    # Another seed than the runs below: other initial weights, so "starts from it" is visible in the weights.
    erw("train", *COMMON, "seed=7", "train.steps=6", "train.ckpt_every=6", "train.out=published", cwd=work)
    return work, ckpt.load_checkpoint(str(work / "published"))


def test_continue_starts_from_the_published_weights_ema_and_moments(published):
    work, start = published
    run = erw(
        "train",
        *COMMON,
        "train.steps=2",
        "train.ckpt_every=2",
        "train.out=continued",
        "--init-from",
        start.uri,
        cwd=work,
    )
    assert f"continue from {start.uri} (phase 2 step 6" in run.stdout
    assert "train: " in run.stdout and "steps 0->2" in run.stdout  # a new run of train.steps steps
    end = ckpt.load_checkpoint(str(work / "continued"))
    assert end.step == 2 and end.meta["init_from"] == start.uri  # the run records what it started from
    # AdamW's per-parameter step counts continue from the published run's: the moments were restored.
    steps = {int(s["step"]) for s in end.train_state["optimizer"]["state"].values()}
    assert steps == {6 + 2}
    demo_lr = load_config(ROOT / "configs/demo.yaml").train.lr
    assert end.train_state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(demo_lr)  # this run's lr

    # Two steps from the published weights stay close to them; a fresh start is far away.
    fresh = erw("train", *COMMON, "train.steps=2", "train.ckpt_every=2", "train.out=fresh", cwd=work)
    assert "continue from" not in fresh.stdout
    scratch = ckpt.load_checkpoint(str(work / "fresh"))

    def distance(a, b):
        return sum(float((a[k].float() - b[k].float()).norm()) for k in a)

    assert distance(end.ema_state, start.ema_state) * 10 < distance(scratch.ema_state, start.ema_state)


def test_continue_refuses_another_model(published):
    work, start = published
    bad = erw(
        "train",
        *COMMON,
        "model.hidden_size=32",
        "train.steps=2",
        "train.out=bad",
        "--init-from",
        start.uri,
        cwd=work,
        check=False,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "cannot continue from" in bad.stderr and "model.hidden_size: 64 in the checkpoint, 32 now" in bad.stderr


ALIGNED = [c for c in COMMON if c != "encoder.name=none"]  # the demo's encoder: a model with projectors


@pytest.fixture(scope="module")
def published_aligned(published):
    """A phase-2 run that aligned to the demo's encoder: its checkpoint holds projectors."""
    work, _ = published
    erw("train", *ALIGNED, "seed=7", "train.steps=4", "train.ckpt_every=4", "train.out=published-aligned", cwd=work)
    start = ckpt.load_checkpoint(str(work / "published-aligned"))
    assert any(name.startswith("projectors.") for name in start.model_state)
    return work, start


def test_continue_without_alignment_leaves_the_projectors_out(published_aligned):
    """A published model with projectors continued by a run with encoder.name=none: the projectors
    (read only by the alignment loss) are left out with their AdamW moments, and the log says so."""
    work, start = published_aligned
    run = erw(
        "train",
        *COMMON,
        "train.steps=2",
        "train.ckpt_every=2",
        "train.out=unaligned",
        "--init-from",
        start.uri,
        cwd=work,
    )
    assert "alignment projector tensors are left out" in run.stdout and "encoder.name=none" in run.stdout
    end = ckpt.load_checkpoint(str(work / "unaligned"))
    assert not any(name.startswith("projectors.") for name in end.model_state)
    assert {int(s["step"]) for s in end.train_state["optimizer"]["state"].values()} == {4 + 2}

    # In process: each restored AdamW moment is the checkpoint's moment of the same parameter (by name).
    from erw.config import load_config as load
    from erw.training.continuation import _checkpoint_model, _trainable_names, continue_from
    from erw.training.handoff import lineage
    from erw.training.step import TrainState
    from erw.training.trainer import build_model

    cfg = load(ROOT / "configs/demo.yaml", [c for c in COMMON[2:] if "=" in c])
    model = build_model(cfg, "train", None)
    state = TrainState.create(model, cfg.train, torch.device("cpu"))
    continue_from(state, cfg, start.uri, lineage(cfg, None, None), lambda _: None)
    then = _trainable_names(_checkpoint_model(start, cfg))
    params = dict(model.named_parameters())
    for name in ("final_layer.linear.weight", "blocks.3.mlp.fc2.weight", "y_embedder.embedding_table.weight"):
        want = start.train_state["optimizer"]["state"][then.index(name)]["exp_avg"]
        assert torch.equal(state.optimizer.state[params[name]]["exp_avg"], want), name
    assert torch.equal(params["final_layer.linear.weight"], start.model_state["final_layer.linear.weight"])


def test_continue_with_alignment_from_an_unaligned_model_is_refused(published):
    work, start = published  # trained with encoder.name=none: no projectors
    bad = erw(
        "train", *ALIGNED, "train.steps=2", "train.out=aligned-now", "--init-from", start.uri, cwd=work, check=False
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert "it was trained without representation alignment" in bad.stderr
    assert "Continue it with encoder.name=none, or train an aligned model from scratch" in bad.stderr
