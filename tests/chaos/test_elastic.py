"""Elastic resumption: a run checkpointed on W ranks resumes on W' ranks and trains, from the
resume point on, on exactly the samples of the uninterrupted 2-rank run, step by step and in
the same places of the global batch (traced with ERW_FAULT_TRACE, sample by sample), and with
the same losses up to float rounding (the per-sample draws are keyed by position)."""

from __future__ import annotations

import pytest
from tests.chaos.harness import STEPS, read_trace, run, train_command

from erw import faults

pytestmark = pytest.mark.chaos


def global_steps(trace: dict[int, list[dict]]) -> list[list[int]]:
    """The sample ids of each step's global batch: every rank's batch of the step, in rank order."""
    ranks = sorted(trace)
    return [sum((trace[r][s]["index"] for r in ranks), []) for s in range(len(trace[ranks[0]]))]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (4, 2)])
def test_resume_on_another_world_size_keeps_the_global_sample_order(
    chaos_shards, uninterrupted, tmp_path, before, after
):
    half = STEPS // 2
    first = run(
        train_command(str(chaos_shards), "out", ranks=before, steps=half),
        tmp_path,
        env={faults.TRACE_ENV: str(tmp_path / "first")},
    )
    assert first.status == 0, first.output
    second = run(
        train_command(str(chaos_shards), "out", ranks=after), tmp_path, env={faults.TRACE_ENV: str(tmp_path / "second")}
    )
    assert second.status == 0, second.output
    assert f"resumed train from out/step-{half:08d} at step {half}" in second.output
    want = global_steps(uninterrupted.trace)
    got = global_steps(read_trace(tmp_path / "first")) + global_steps(read_trace(tmp_path / "second"))
    assert len(got) == STEPS
    for step, (a, b) in enumerate(zip(got, want)):
        assert a == b, f"step {step}: the global batch differs from the uninterrupted run's"


# ---------------------------------------------------------------------------------------------
# The loss curve across a world-size change, read at full precision from the MLflow run that the
# training logs to (SQLite store; a resumed run continues its run id's MLflow run).

# Two runs with the same samples and per-sample draws differ only in float rounding: a step's
# micro-batches are summed in another grouping and DDP all-reduces the gradients in another
# order, and AdamW carries that into the next steps. Measured: at most 2.4e-7 absolute (2 ulp of
# a loss near 1.6) over the 8 steps, 2 -> 1 and 1 -> 2 (2 -> 1 with grad_accum 2: 0); with the draws seeded per (seed, rank,
# step), as before, this test fails: 0.044 (2 -> 1) and 0.038 (1 -> 2).
LOSS_TOLERANCE = 1e-5


def logged_losses(tracking_uri: str, run_id: str) -> dict[int, float]:
    """step -> the loss logged to MLflow by the erw run `run_id` (all its incarnations)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("erw")
    (found,) = client.search_runs([experiment.experiment_id], f"tags.`erw.run` = '{run_id}/train'")
    return {m.step: m.value for m in client.get_metric_history(found.info.run_id, "loss")}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> str:
    pytest.importorskip("mlflow")
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(scope="module")
def uninterrupted_losses(chaos_shards, tracked, tmp_path_factory) -> dict[int, float]:
    work = tmp_path_factory.mktemp("tracked-uninterrupted")
    outcome = run(
        train_command(str(chaos_shards), "out"),
        work,
        env={"MLFLOW_TRACKING_URI": tracked, "ERW_RUN_ID": "uninterrupted"},
    )
    assert outcome.status == 0, outcome.output
    return logged_losses(tracked, "uninterrupted")


@pytest.mark.parametrize("before, after, accum", [(2, 1, 1), (1, 2, 1), (4, 2, 1), (2, 1, 2)])
def test_resume_on_another_world_size_continues_the_loss_curve(
    chaos_shards, tracked, uninterrupted_losses, tmp_path, before, after, accum
):
    """Every sample's noise, time and label drop are keyed by (seed, step, position in the global
    batch), so from the resume on the losses are the uninterrupted 2-rank run's, up to rounding,
    also when the resumed run splits its rank's batch into `accum` micro-batches."""
    half, run_id = STEPS // 2, f"elastic-{before}-{after}-{accum}"
    env = {"MLFLOW_TRACKING_URI": tracked, "ERW_RUN_ID": run_id}
    first = run(train_command(str(chaos_shards), "out", ranks=before, steps=half), tmp_path, env=env)
    assert first.status == 0, first.output
    second = run(
        train_command(str(chaos_shards), "out", ranks=after, extra=(f"train.grad_accum={accum}",)), tmp_path, env=env
    )
    assert second.status == 0, second.output
    assert f"resumed train from out/step-{half:08d} at step {half}" in second.output
    got, want = logged_losses(tracked, run_id), uninterrupted_losses
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    worst = max(abs(got[s] - want[s]) for s in want)
    print(
        f"{before} -> {after} ranks, grad_accum {accum} after: largest loss difference {worst:.3g} over steps 1..{STEPS}"
    )
    for step in range(1, STEPS + 1):  # before the resume on `before` ranks, after it on `after`
        assert abs(got[step] - want[step]) <= LOSS_TOLERANCE, (
            f"step {step}: loss {got[step]!r} after resuming on {after} rank(s), {want[step]!r} uninterrupted"
        )
