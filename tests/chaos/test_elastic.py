"""Elastic resumption: a run checkpointed on W ranks resumes on W' ranks and trains, from the
resume point on, on exactly the samples of the uninterrupted 2-rank run, step by step and in
the same places of the global batch (traced with ERW_FAULT_TRACE, sample by sample)."""
from __future__ import annotations

import pytest
from harness import STEPS, read_trace, run, train_command

from erw import faults

pytestmark = pytest.mark.chaos


def global_steps(trace: dict[int, list[dict]]) -> list[list[int]]:
    """The sample ids of each step's global batch: every rank's batch of the step, in rank order."""
    ranks = sorted(trace)
    return [sum((trace[r][s]["index"] for r in ranks), []) for s in range(len(trace[ranks[0]]))]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (4, 2)])
def test_resume_on_another_world_size_keeps_the_global_sample_order(chaos_shards, uninterrupted, tmp_path,
                                                                    before, after):
    half = STEPS // 2
    first = run(train_command(str(chaos_shards), "out", ranks=before, steps=half), tmp_path,
                env={faults.TRACE_ENV: str(tmp_path / "first")})
    assert first.status == 0, first.output
    second = run(train_command(str(chaos_shards), "out", ranks=after), tmp_path,
                 env={faults.TRACE_ENV: str(tmp_path / "second")})
    assert second.status == 0, second.output
    assert f"resumed train from out/step-{half:08d} at step {half}" in second.output
    want = global_steps(uninterrupted.trace)
    got = global_steps(read_trace(tmp_path / "first")) + global_steps(read_trace(tmp_path / "second"))
    assert len(got) == STEPS
    for step, (a, b) in enumerate(zip(got, want)):
        assert a == b, f"step {step}: the global batch differs from the uninterrupted run's"
