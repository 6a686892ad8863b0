"""Fixtures of the chaos suite: the digits shards and the uninterrupted reference run, made once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from erw import faults
from erw.training import checkpoint as ckpt
from tests.chaos.harness import STEPS, make_shards, read_trace, run, train_command


@dataclass(frozen=True)
class Reference:
    out: Path  # train.out of the uninterrupted 2-rank run: a checkpoint every CKPT_EVERY steps
    final: str  # its last checkpoint
    trace: dict[int, list[dict]]  # the batches each rank took (ERW_FAULT_TRACE)


@pytest.fixture(scope="session")
def chaos_shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("chaos-data"))


@pytest.fixture(scope="session")
def uninterrupted(chaos_shards, tmp_path_factory) -> Reference:
    work = tmp_path_factory.mktemp("uninterrupted")
    outcome = run(train_command(str(chaos_shards), "out"), work, env={faults.TRACE_ENV: str(work / "trace")})
    assert outcome.status == 0, outcome.output
    return Reference(work / "out", ckpt.step_uri(str(work / "out"), STEPS), read_trace(work / "trace"))
