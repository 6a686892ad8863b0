"""The training step's Volcano job, run as containers of the built image.

`erw launch --dry-run` renders the job exactly as the train step submits it (TorchX's real
Kubernetes dry-run plus erw's settings); each of its pods becomes one container with the pod's
command, environment, volumes, user and security context (tests/image/engine.py), host names as
Volcano's svc plugin gives them. Data and checkpoints live on S3 (a local endpoint), as in a
cluster: the pods share nothing else. 2 pods x 1 process form one torchrun group over c10d.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from erw.training import checkpoint as ckpt
from tests.chaos.harness import TINY, identical, make_shards, upload_tree
from tests.image.engine import Pod, pod_flags, volcano_pods

pytestmark = pytest.mark.image

ERW = str(Path(sys.executable).parent / "erw")
STEPS, CKPT_EVERY = 40, 4
SECRET = "erw-s3"
# Longer than a checkpoint write takes here; Volcano gives a deleted pod this long before SIGKILL.
GRACE_S = 60


@pytest.fixture(scope="module")
def shards_uri(s3_endpoint, tmp_path_factory) -> str:
    import boto3

    boto3.client("s3").create_bucket(Bucket="pods")
    upload_tree(make_shards(tmp_path_factory.mktemp("pod-data")), "s3://pods/shards")
    return "s3://pods/shards"


def render_job(image: str, shards: str, out: str) -> dict:
    """The Volcano job of `erw launch` for a 2-node train step, as its dry run prints it."""
    spec = {
        "scheduler": "kubernetes",
        "image": image,
        "nodes": 2,
        "procs_per_node": 1,
        "gpus_per_node": 0,
        "cpus_per_node": 1,
        "memory_gb": 4,
        "s3_secret": SECRET,
        "namespace": "erw",
        "grace_period_s": GRACE_S,
        "run_id": "pods",
        "step": "train",
    }
    command = [
        "train",
        "--config",
        "configs/demo.yaml",
        *TINY,
        f"train.steps={STEPS}",
        f"train.ckpt_every={CKPT_EVERY}",
    ]
    command += [f"data.shards={shards}", f"train.out={out}", "--resume", "auto"]
    printed = subprocess.run(
        [ERW, "launch", "--dry-run", "--spec", json.dumps(spec), "--", *command],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return yaml.safe_load(printed)


class Group:
    """The job's pods, started together (a Volcano gang) and followed to their ends."""

    def __init__(self, engine, job: dict, workdir: Path, secrets: dict):
        self.engine, self.pods = engine, volcano_pods(job, workdir)
        self.secrets = secrets
        self.procs: dict[str, subprocess.Popen] = {}
        self.output: dict[str, list[str]] = {}
        self.step_seen = threading.Condition()
        self.last_step = 0

    def start(self) -> Group:
        for pod in self.pods:
            self.engine("rm", "-f", pod.name, check=False)
        for pod in self.pods:
            proc = self.engine.popen("run", "--rm", *pod_flags(self.engine, pod, self.secrets))
            self.procs[pod.name], self.output[pod.name] = proc, []
            threading.Thread(target=self._read, args=(pod, proc), daemon=True).start()
        return self

    def _read(self, pod: Pod, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.output[pod.name].append(line)
            if m := re.search(r"train step (\d+)/", line):
                with self.step_seen:
                    self.last_step = max(self.last_step, int(m[1]))
                    self.step_seen.notify_all()

    def wait_for_step(self, step: int, timeout: float = 300) -> None:
        with self.step_seen:
            assert self.step_seen.wait_for(lambda: self.last_step >= step, timeout), self.log()

    def signal(self, pod: Pod, signal: str) -> None:
        self.engine("kill", "--signal", signal, pod.name)

    def restart_job(self) -> None:
        """Volcano's RestartJob: every pod still running is deleted (SIGTERM, SIGKILL after the grace
        period), then all are created again with the same names and spec."""
        for pod in self.pods:
            if self.procs[pod.name].poll() is None:
                self.engine("stop", "--time", str(GRACE_S), pod.name, check=False)
        self.wait()

    def wait(self, timeout: float = 600) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.engine("rm", "-f", name, check=False)
                raise AssertionError(f"pod {name} hung\n{self.log()}") from None
        return codes

    def log(self) -> str:
        return "\n".join(f"--- {name}\n{''.join(lines[-60:])}" for name, lines in self.output.items())


@pytest.fixture(scope="module")
def secrets(s3_endpoint) -> dict:
    import os

    return {SECRET: {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}}


def test_two_pods_form_one_group_train_and_checkpoint(engine, image, shards_uri, secrets, tmp_path):
    out = "s3://pods/uninterrupted"
    job = render_job(image, shards_uri, out)
    group = Group(engine, job, tmp_path, secrets).start()
    codes = group.wait()
    assert set(codes.values()) == {0}, group.log()
    final = ckpt.resolve_checkpoint(out)
    assert final == ckpt.step_uri(out, STEPS), group.log()
    print(f"\n2 pods x 1 process: one torchrun group trained {STEPS} steps; final checkpoint {final}")


def test_sigterm_checkpoints_and_a_restarted_job_resumes_bit_identical(engine, image, shards_uri, secrets, tmp_path):
    reference = "s3://pods/uninterrupted"
    if not ckpt.resolve_checkpoint(reference):
        pytest.fail("the uninterrupted run (the test above) must run first")
    out = "s3://pods/interrupted"
    job = render_job(image, shards_uri, out)

    # A node drain: SIGTERM reaches one pod. Every rank checkpoints that step; the pod exits 143.
    first = Group(engine, job, tmp_path / "1", secrets).start()
    first.wait_for_step(6)
    first.signal(first.pods[0], "TERM")
    codes = first.wait()
    assert codes[first.pods[0].name] == 143, first.log()
    stopped = ckpt.resolve_checkpoint(out)
    assert stopped and stopped != ckpt.step_uri(out, STEPS), first.log()

    # Volcano's RestartJob after the preemption, then a pod killed outright: RestartJob again.
    second = Group(engine, job, tmp_path / "2", secrets).start()
    second.wait_for_step(int(re.search(r"(\d+)$", stopped)[1]) + 4)
    second.signal(second.pods[1], "KILL")
    second.restart_job()

    third = Group(engine, job, tmp_path / "3", secrets).start()
    codes = third.wait()
    assert set(codes.values()) == {0}, third.log()
    final = ckpt.resolve_checkpoint(out)
    assert final == ckpt.step_uri(out, STEPS), third.log()
    starts = [
        int(m) for m in re.findall(r"resumed train from \S+ at step (\d+)", "".join(sum(third.output.values(), [])))
    ]
    same, diff = identical(final, ckpt.step_uri(reference, STEPS))
    assert same, f"resumed run differs from the uninterrupted one by {diff}\n{third.log()}"
    print(
        f"\nSIGTERM at step >= 6: exit 143, checkpoint {stopped}; pod killed, job restarted, resumed at step "
        f"{starts}; final step {STEPS} bit-identical to the uninterrupted run"
    )
