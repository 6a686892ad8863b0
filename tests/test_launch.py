"""The TorchX launcher: the Volcano job it would submit, and real 2-process torchrun jobs run locally."""
import io
import re
import textwrap
from pathlib import Path

import pytest

from erw.cli import main
from erw.launch import (
    JobSpec,
    LaunchError,
    SchedulerOptions,
    dry_run,
    launch,
    parse_duration,
    parse_toleration,
    problems,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
K8S = SchedulerOptions(scheduler="kubernetes", queue="erw-training", namespace="ml", service_account="erw-trainer")
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def xl_spec(**overrides) -> JobSpec:
    fields = dict(
        erw_args=["train", "--config", "configs/imagenet256-sit-xl2.yaml", "--resume", "auto"],
        nodes=2,
        procs_per_node=8,
        gpus_per_node=8,
        cpus_per_node=90,
        memory_mb_per_node=900_000,
        image="registry.example.com/erw:0.1.0",
        node_selector={"erw.dev/pool": "h100"},
        tolerations=[GPU_TOLERATION],
        env={"AWS_ENDPOINT_URL": "http://minio.kubeflow:9000"},
        s3_secret="erw-s3",
        run_id="run-42",
        metrics_port=9400,
        max_retries=3,
    )
    fields.update(overrides)
    return JobSpec(**fields)


def test_volcano_job_has_the_requested_topology_resources_and_placement():
    job = dry_run(xl_spec(), K8S)
    assert job["kind"] == "Job" and job["apiVersion"].startswith("batch.volcano.sh/")
    spec = job["spec"]
    assert spec["queue"] == "erw-training" and spec["schedulerName"] == "volcano"
    assert spec["maxRetry"] == 3
    assert len(spec["tasks"]) == 2  # one task per node
    for node, task in enumerate(spec["tasks"]):
        pod = task["template"]
        (container,) = pod["spec"]["containers"]
        assert container["image"] == "registry.example.com/erw:0.1.0"
        command = " ".join(container["command"])
        assert "--nnodes 2 --nproc_per_node 8" in command
        assert "-m erw.cli train --config configs/imagenet256-sit-xl2.yaml --resume auto" in command
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"] == "8"
        assert limits["memory"] == "900000M" and int(requests["memory"].rstrip("M")) > 0
        assert limits["cpu"] == "90000m"
        assert pod["spec"]["nodeSelector"] == {"erw.dev/pool": "h100"}
        assert pod["spec"]["tolerations"] == [GPU_TOLERATION]
        assert pod["spec"]["serviceAccountName"] == "erw-trainer"
        assert pod["metadata"]["labels"]["erw.dev/run-id"] == "run-42"
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["ERW_RUN_ID"] == "run-42" and env["AWS_ENDPOINT_URL"] == "http://minio.kubeflow:9000"
        assert container["envFrom"] == [{"secretRef": {"name": "erw-s3", "optional": True}}]
        assert not any("SECRET" in name for name in env)  # credentials only through the Secret
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert [ports[f"metrics-{r}"] for r in range(8)] == list(range(9400, 9408))


def test_instance_type_capability_becomes_a_node_selector():
    job = dry_run(xl_spec(instance_type="p5.48xlarge", node_selector={}), K8S)
    selector = job["spec"]["tasks"][0]["template"]["spec"]["nodeSelector"]
    assert selector == {"node.kubernetes.io/instance-type": "p5.48xlarge"}


def test_bad_jobs_are_refused_before_submission():
    found = problems(xl_spec(nodes=0, procs_per_node=16, image=""), K8S)
    text = "\n".join(found)
    assert "--nodes must be at least 1" in text
    assert "--procs-per-node 16 exceeds --gpus-per-node 8" in text
    assert "--image is required" in text
    assert any("must be one of: erw warmup | train" in p for p in problems(xl_spec(erw_args=["sample"]), K8S))
    with pytest.raises(LaunchError, match="cannot launch"):
        dry_run(xl_spec(nodes=0), K8S)


def test_flag_parsers_say_what_is_wrong():
    assert parse_toleration("nvidia.com/gpu:NoSchedule") == GPU_TOLERATION
    assert parse_toleration("pool=gpu:NoExecute") == {"key": "pool", "operator": "Equal", "value": "gpu", "effect": "NoExecute"}
    with pytest.raises(LaunchError, match="KEY\\[=VALUE\\]\\[:EFFECT\\]"):
        parse_toleration("pool=gpu:Sometimes")
    assert parse_duration("45m") == 2700 and parse_duration("72h") == 72 * 3600 and parse_duration("30") == 30
    with pytest.raises(LaunchError, match="positive duration"):
        parse_duration("soon")


def test_cli_dry_run_prints_the_volcano_job(capsys):
    rc = main([
        "launch", "--scheduler", "kubernetes", "--image", "erw:test", "--nodes", "2", "--procs-per-node", "2",
        "--gpus-per-node", "2", "--node-selector", "pool=gpu", "--toleration", "nvidia.com/gpu:NoSchedule",
        "--dry-run", "--", "train", "--config", str(CONFIGS / "demo.yaml"), "encoder.name=none",
    ])
    out = capsys.readouterr().out
    assert rc == 0
    assert "kind: Job" in out and "pool: gpu" in out and "--nnodes 2 --nproc_per_node 2" in out


def test_cli_rejects_a_config_that_cannot_run_at_this_world_size(capsys):
    # demo batch 32 over 3 nodes x 1 process does not split evenly: caught before anything is submitted.
    rc = main(["launch", "--nodes", "3", "--dry-run", "--", "train", "--config", str(CONFIGS / "demo.yaml"), "encoder.name=none"])
    assert rc == 2
    assert "not divisible by world size 3" in capsys.readouterr().err


RANK_JOB = """
import os, sys
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
print(f"hello from rank {rank} of {world}", flush=True)
if sys.argv[1:] == ["fail"] and rank == 1:
    raise RuntimeError("rank 1 found no shards under s3://bucket/missing")
"""


@pytest.fixture
def rank_job(tmp_path, monkeypatch):
    # local_cwd runs torchrun in the current directory, where `python -m rank_job` finds this file.
    (tmp_path / "rank_job.py").write_text(textwrap.dedent(RANK_JOB))
    monkeypatch.chdir(tmp_path)
    return JobSpec(erw_args=[], module="rank_job", procs_per_node=2, run_id="local-test")


def test_local_torchrun_job_runs_two_ranks(rank_job):
    out = io.StringIO()
    launch(rank_job, SchedulerOptions(scheduler="local_cwd"), timeout_s=120, poll_s=0.2, out=out)
    log = out.getvalue()
    assert "hello from rank 0 of 2" in log and "hello from rank 1 of 2" in log
    assert "succeeded" in log


def test_local_failing_job_fails_with_the_workers_reason(rank_job):
    rank_job.erw_args = ["fail"]
    with pytest.raises(LaunchError) as err:
        launch(rank_job, SchedulerOptions(scheduler="local_cwd"), timeout_s=120, poll_s=0.2, out=io.StringIO())
    message = str(err.value)
    assert "rank 1 exited with code 1" in message
    assert message.splitlines()[0].endswith("rank 1 exited with code 1: RuntimeError: rank 1 found no shards under s3://bucket/missing")


def test_local_job_past_its_deadline_is_stopped(tmp_path, monkeypatch):
    (tmp_path / "slow_job.py").write_text("import time\nprint('working', flush=True)\ntime.sleep(60)\n")
    monkeypatch.chdir(tmp_path)
    spec = JobSpec(erw_args=[], module="slow_job", procs_per_node=1)
    with pytest.raises(LaunchError, match="did not finish within 3s.*deleted"):
        launch(spec, SchedulerOptions(scheduler="local_cwd"), timeout_s=3, poll_s=0.2, out=io.StringIO())


def test_a_failing_training_job_fails_the_pipeline_step(tmp_path, capsys):
    # The KFP step's view: the component runs `erw launch ... -- train ...` and must fail with the reason.
    from components.common import run_erw

    missing = tmp_path / "no-such-dataset"
    with pytest.raises(SystemExit, match="erw launch failed with exit code 2"):
        run_erw([
            "launch", "--procs-per-node", "2", "--timeout", "5m", "--",
            "train", "--config", str(CONFIGS / "demo.yaml"), "encoder.name=none", f"data.shards={missing}",
        ])
    err = capsys.readouterr().err
    assert re.search(rf"rank [01] exited with code 2: erw train: error: {re.escape(str(missing))} has no manifest.json", err)


def test_failure_report_reads_kubernetes_logs():
    # Kubernetes log lines carry a timestamp before torchrun's "[local_rank]:" prefix.
    from collections import deque

    from torchx.specs import AppState, AppStatus

    from erw.launch import failure_report

    node0 = deque(["2026-01-01T00:00:00Z [0]:train step 10/100 | loss 0.5\n"])
    node1 = deque([
        "2026-01-01T00:00:01Z [3]:train step 10/100 | loss 0.5\n",
        "2026-01-01T00:00:02Z [3]:torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n",
        "2026-01-01T00:00:03Z Root Cause (first observed failure):\n",
        "2026-01-01T00:00:03Z [0]:\n",
        "2026-01-01T00:00:03Z   rank      : 11 (local_rank: 3)\n",
        "2026-01-01T00:00:03Z   exitcode  : 1 (pid: 77)\n",
    ])
    report = failure_report("kubernetes://erw/erw-train-x", AppStatus(AppState.FAILED), [node0, node1], "2h")
    first = report.splitlines()[0]
    assert first == (
        "job kubernetes://erw/erw-train-x failed after 2h: rank 11 exited with code 1: "
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    )
    assert "--- last output of the workers on node 1 ---" in report and "Root Cause" not in report
