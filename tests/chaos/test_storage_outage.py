"""An S3 outage longer than the retry budget (ERW_S3_RETRY_SECONDS) in the middle of training: the
run checkpoints the step it reached before it exits, and says where `--resume auto` continues.

The shards are on S3 behind tests/s3proxy.py; the outage starts once step 3 is logged and lasts
until the test clears it (the loader goes back to S3 a few steps later). A single `erw train`
process of the chaos suite's tiny model with its DataLoader worker, and a retry budget of 2 s.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.chaos.harness import BIN, free_port, identical, run, train_command, upload_tree

from erw.training import checkpoint as ckpt

pytestmark = pytest.mark.chaos

STEPS = 40
NO_PERIODIC = ("train.ckpt_every=1000",)  # the only checkpoint before the end is the outage's


def _outage_after_step_3(proxy):
    def on_line(line: str) -> None:
        if line.startswith("train step 3/"):
            proxy.outage(3600)  # until the test clears it

    return on_line


def _stopped_at(output: str) -> int:
    found = re.search(r"storage failed at step (\d+); checkpointing step \1 before exiting", output)
    assert found, output[-3000:]
    return int(found.group(1))


def test_an_outage_past_the_budget_checkpoints_the_current_step_and_resume_continues_exactly(
    chaos_shards, s3_bucket, s3_proxy, monkeypatch, tmp_path
):
    """Shards on S3, checkpoints on local disk: the step reached is checkpointed, the message names
    it, and `--resume auto` from it ends bit-identical to an uninterrupted run."""
    monkeypatch.setenv("ERW_S3_RETRY_SECONDS", "2")
    upload_tree(chaos_shards, f"{s3_bucket}/shards")
    s3_proxy.clear()
    command = train_command(f"{s3_bucket}/shards", "out", ranks=1, steps=STEPS, extra=NO_PERIODIC)
    outcome = run(command, tmp_path, on_line=_outage_after_step_3(s3_proxy))
    injected = dict(s3_proxy.injected)
    s3_proxy.clear()
    assert outcome.status == 2 and "Traceback" not in outcome.output, outcome.output[-3000:]
    assert injected.get("outage", 0) >= 1
    step = _stopped_at(outcome.output)
    assert 3 <= step < STEPS
    error = outcome.output[outcome.output.index("erw train: error:") :]
    assert f"train stopped at step {step}: cannot read {s3_bucket}/shards/" in error
    assert "[retried for 2 s, the budget ERW_S3_RETRY_SECONDS=2" in error
    assert f"Step {step} is checkpointed at out/step-{step:08d}: `--resume auto` continues from it" in error
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path / "out"))] == [step]

    resumed = run(command, tmp_path)
    assert resumed.status == 0 and resumed.resumed_at() == [step], resumed.output[-3000:]
    reference = run(train_command(str(chaos_shards), "reference", ranks=1, steps=STEPS, extra=NO_PERIODIC), tmp_path)
    assert reference.status == 0, reference.output[-3000:]
    assert identical(ckpt.step_uri(str(tmp_path / "out"), STEPS), ckpt.step_uri(str(tmp_path / "reference"), STEPS))[0]


def test_when_the_checkpoint_store_is_down_too_both_failures_are_said(
    chaos_shards, s3_bucket, s3_proxy, monkeypatch, tmp_path
):
    """Shards and checkpoints on the same S3: the checkpoint attempt fails as well; the message
    says both, and names the last committed checkpoint (the one this run resumed from)."""
    monkeypatch.setenv("ERW_S3_RETRY_SECONDS", "2")
    upload_tree(chaos_shards, f"{s3_bucket}/shards")
    s3_proxy.clear()
    out = f"{s3_bucket}/out"
    first = run(train_command(f"{s3_bucket}/shards", out, ranks=1, steps=2), tmp_path)
    assert first.status == 0, first.output[-3000:]
    previous = ckpt.step_uri(out, 2)

    outcome = run(
        train_command(f"{s3_bucket}/shards", out, ranks=1, steps=STEPS, extra=NO_PERIODIC),
        tmp_path,
        on_line=_outage_after_step_3(s3_proxy),
    )
    s3_proxy.clear()
    assert outcome.status == 2 and "Traceback" not in outcome.output, outcome.output[-3000:]
    step = _stopped_at(outcome.output)
    error = outcome.output[outcome.output.index("erw train: error:") :]
    assert f"train stopped at step {step}: cannot read {s3_bucket}/shards/" in error
    assert (
        f"The checkpoint of step {step} before exiting failed too: cannot write checkpoint {out}/step-{step:08d}"
        in error
    )
    assert f"The previous checkpoint {previous} is intact: `--resume auto` continues from it" in error
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]


# With several ranks: the rank whose data fails first need not be rank 0, which writes the
# checkpoints and would otherwise wait in the step's gradient all-reduce until torchrun stopped it.
# An outage cannot pick a rank, so here the batch source of rank 1 alone raises the StorageError that
# the loader raises after the budget; the rest is real: 2 processes under torchrun, gloo, the trainer.
TWO_RANKS = """
import sys
sys.path.insert(0, sys.argv[1])  # the repository
from tests.test_trainer import Batches, tiny_config

from erw.errors import ErwError
from erw.storage import StorageError
from erw.training.distributed import init_distributed, shutdown
from erw.training.trainer import run

out, steps, fail_at = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
d = init_distributed()


class OutageOnRank1(Batches):
    def __iter__(self):
        for batch in super().__iter__():
            if d.rank == 1 and self.position == fail_at + 1:  # the first batch of step fail_at + 1
                raise StorageError("cannot read s3://bucket/shards/shard-000001.tar: the S3 endpoint cannot be reached "
                                   "[retried for 2 s, the budget ERW_S3_RETRY_SECONDS=2]")
            yield batch


cfg = tiny_config(out, "encoder.name=none", f"train.steps={steps}", "train.ckpt_every=100", "train.ema_decay=0.9")
try:
    run(cfg, "train", OutageOnRank1(batch_size=4), d, log=print)  # 2 ranks x 4 = train.batch_size 8
except ErwError as err:
    print(f"rank {d.rank} error: {err}", flush=True)
    sys.exit(2)
finally:
    shutdown(d)
"""


def _two_ranks(tmp_path: Path, out: Path, steps: int, fail_at: int):
    cmd = [
        str(BIN / "erw"),
        "torchrun",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(tmp_path / "two_ranks.py"),
        str(Path(__file__).resolve().parents[2]),
        str(out),
        str(steps),
        str(fail_at),
    ]
    (tmp_path / "two_ranks.py").write_text(TWO_RANKS)
    return run(cmd, tmp_path, timeout=300)


def test_with_two_ranks_the_step_is_checkpointed_whichever_rank_fails_first(tmp_path):
    outcome = _two_ranks(tmp_path, tmp_path / "a", steps=10, fail_at=4)
    assert outcome.status == 1 and "Traceback" not in outcome.output, outcome.output[-3000:]  # erw torchrun: failed
    assert "train: storage failed at step 4; checkpointing step 4 before exiting" in outcome.output
    assert (
        "rank 1 error: rank 1: train stopped at step 4: cannot read s3://bucket/shards/shard-000001.tar"
        in outcome.output
    )
    assert (
        "rank 0 error: train stopped at step 4: another rank could not read its data (rank 0 could)" in outcome.output
    )
    assert f"Step 4 is checkpointed at {tmp_path}/a/train/step-00000004" in outcome.output
    saved = ckpt.load_checkpoint(str(tmp_path / "a/train"))
    # Rank 0 had taken step 5's first batch when rank 1 failed: its position went back to step 4's end.
    assert saved.step == 4 and saved.train_state["data"] == {"position": 4}
    reference = _two_ranks(tmp_path, tmp_path / "b", steps=4, fail_at=-1)
    assert reference.status == 0, reference.output[-3000:]
    assert identical(saved.uri, ckpt.step_uri(str(tmp_path / "b/train"), 4))[0]
