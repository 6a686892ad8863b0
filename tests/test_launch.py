"""The TorchX launcher: the launch spec, the Volcano job it renders, and real 2-process torchrun
jobs run locally. The job lifecycle against a Kubernetes API is in tests/test_launch_lifecycle.py."""

import io
import json
import re
import textwrap
from pathlib import Path

import pytest
from tests.pod_security import restricted_violations

from erw.cli import build_parser, main
from erw.launch import (
    LaunchError,
    LaunchSpec,
    Preempted,
    dry_run,
    launch,
    parse_duration,
    parse_toleration,
)
from erw.launch.commands import parse_command, spec_from_args

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
GOLDEN = ROOT / "tests" / "golden"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
XL_COMMAND = ["train", "--config", "configs/imagenet256-sit-xl2.yaml", "--resume", "auto"]


def xl_spec(**overrides) -> LaunchSpec:
    fields = dict(
        scheduler="kubernetes",
        queue="erw-training",
        namespace="ml",
        service_account="erw-trainer",
        nodes=2,
        procs_per_node=8,
        gpus_per_node=8,
        cpus_per_node=90,
        memory_gb=900.0,
        image="registry.example.com/erw:0.1.0",
        node_selector={"erw.dev/pool": "h100"},
        tolerations=[GPU_TOLERATION],
        env={"AWS_ENDPOINT_URL": "http://minio.kubeflow:9000"},
        s3_secret="erw-s3",
        run_id="run-42",
        metrics_port=9400,
        max_restarts=3,
    )
    fields.update(overrides)
    return LaunchSpec(**fields)


def parse_launch(argv: list[str]) -> tuple[LaunchSpec, list[str]]:
    return spec_from_args(build_parser().parse_args(["launch", *argv]))


# ---------------------------------------------------------------------------------------------
# The spec: one typed value, from JSON or flags.


def test_spec_round_trips_through_json_and_defaults_are_the_flag_defaults():
    spec = xl_spec(pending_timeout="30m", step="train", grace_period_s=900)
    assert LaunchSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert LaunchSpec.from_dict({}) == LaunchSpec() == parse_launch(["--", "train"])[0]
    assert set(LaunchSpec().to_dict()) == {
        "scheduler",
        "image",
        "nodes",
        "procs_per_node",
        "gpus_per_node",
        "cpus_per_node",
        "memory_gb",
        "node_selector",
        "tolerations",
        "env",
        "s3_secret",
        "queue",
        "namespace",
        "service_account",
        "priority_class",
        "name",
        "instance_type",
        "timeout",
        "pending_timeout",
        "max_restarts",
        "resubmit_preempted",
        "metrics_port",
        "run_id",
        "step",
        "grace_period_s",
    }  # the keys the pipeline's components build (notes/launch-spec.md)


def test_spec_refuses_unknown_keys_and_wrong_types_naming_each():
    with pytest.raises(LaunchError) as err:
        LaunchSpec.from_dict({"max_retries": 3, "nodes": "4", "scheduler": "kubernets", "node_selector": {"a": 1}})
    message = str(err.value)
    assert "unknown launch spec key 'max_retries' (did you mean 'max_restarts'?)" in message
    assert "nodes: expected an integer, got '4'" in message
    assert "scheduler: must be one of local_cwd, kubernetes, got 'kubernets' (did you mean 'kubernetes'?)" in message
    assert "node_selector: expected an object of strings to strings" in message
    with pytest.raises(LaunchError, match="expected a number"):
        LaunchSpec.from_dict({"memory_gb": True})
    assert LaunchSpec.from_dict({"memory_gb": 64}).memory_gb == 64.0  # JSON has one number type


def test_spec_from_json_text_or_file_and_explicit_flags_win(tmp_path):
    text = json.dumps(
        {
            "scheduler": "kubernetes",
            "image": "erw:1",
            "nodes": 4,
            "queue": "erw",
            "node_selector": {"pool": "a"},
            "max_restarts": 2,
        }
    )
    path = tmp_path / "spec.json"
    path.write_text(text)
    for source in (text, str(path)):
        spec, command = parse_launch(
            ["--spec", source, "--nodes", "2", "--node-selector", "pool=b", "--", "train", "-x"]
        )
        assert (spec.nodes, spec.node_selector, spec.image, spec.max_restarts) == (2, {"pool": "b"}, "erw:1", 2)
        assert command == ["train", "-x"]
    with pytest.raises(LaunchError, match="neither a JSON object nor an existing file"):
        parse_launch(["--spec", str(tmp_path / "missing.json"), "--", "train"])
    with pytest.raises(LaunchError, match="not valid JSON"):
        parse_launch(["--spec", "{nodes: 2}", "--", "train"])


def test_bad_specs_are_refused_before_submission():
    found = xl_spec(
        nodes=0, procs_per_node=16, image="", pending_timeout="soon", tolerations=[{"value": "x"}]
    ).problems()
    text = "\n".join(found)
    assert "nodes must be at least 1" in text
    assert "procs_per_node 16 exceeds gpus_per_node 8" in text
    assert "image is required" in text
    assert "pending_timeout 'soon' is not a positive duration" in text
    assert "toleration {'value': 'x'} needs 'key'" in text
    with pytest.raises(LaunchError, match="cannot launch"):
        dry_run(xl_spec(nodes=0), XL_COMMAND)
    with pytest.raises(LaunchError, match="pod names would reach 64 characters"):
        dry_run(xl_spec(name="x" * 37, nodes=10), XL_COMMAND)  # x*37-<14 random>-trainer-9-0
    dry_run(xl_spec(name="x" * 36, nodes=10), XL_COMMAND)  # 63: fits
    with pytest.raises(LaunchError, match="must be one of: erw warmup \\| train"):
        parse_command(["sample", "--config", "x.yaml"])
    with pytest.raises(LaunchError, match="required: --config"):
        parse_command(["train"])
    assert parse_command(XL_COMMAND + ["train.lr=1e-4"]).overrides == ("train.lr=1e-4",)


def test_flag_parsers_say_what_is_wrong():
    assert parse_toleration("nvidia.com/gpu:NoSchedule") == GPU_TOLERATION
    assert parse_toleration("pool=gpu:NoExecute") == {
        "key": "pool",
        "operator": "Equal",
        "value": "gpu",
        "effect": "NoExecute",
    }
    with pytest.raises(LaunchError, match="KEY\\[=VALUE\\]\\[:EFFECT\\]"):
        parse_toleration("pool=gpu:Sometimes")
    assert parse_duration("45m") == 2700 and parse_duration("72h") == 72 * 3600 and parse_duration("30") == 30
    with pytest.raises(LaunchError, match="positive duration"):
        parse_duration("soon")


# ---------------------------------------------------------------------------------------------
# The Volcano job.

README_EXAMPLE = (
    "--scheduler kubernetes --image REGISTRY/erw:0.1.0 --queue erw --nodes 4 --procs-per-node 8 "
    "--gpus-per-node 8 --cpus-per-node 96 --memory-gb 1000 --node-selector erw.dev/pool=gpu "
    "--toleration nvidia.com/gpu:NoSchedule --s3-secret erw-s3 --service-account erw-trainer "
    "--max-restarts 3 --timeout 120h -- train --config configs/imagenet256-sit-xl2.yaml --resume auto"
).split()


def normalized(job: dict) -> dict:
    """The job with TorchX's random parts (unique name, session id) replaced by placeholders."""
    text = json.dumps(job).replace(job["metadata"]["name"], "<job-name>")
    text = re.sub(
        r'"TORCHX_INTERNAL_SESSION_ID", "value": "[^"]+"', '"TORCHX_INTERNAL_SESSION_ID", "value": "<session>"', text
    )
    return json.loads(text)


def test_flags_spec_and_volcano_job_match_the_job_before_the_spec(monkeypatch):
    """README's example: flags -> LaunchSpec -> JSON -> LaunchSpec -> Volcano job equals the job the
    launcher rendered before LaunchSpec existed (tests/golden, rendered by erw/launch.py at eca5181),
    except for exactly the changes the cluster review asked for."""
    for name in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    spec, command = parse_launch(README_EXAMPLE)
    via_json = parse_launch(["--spec", json.dumps(spec.to_dict()), "--", *command])
    assert via_json == (spec, command)
    job = normalized(dry_run(via_json[0], command))

    expected = json.loads((GOLDEN / "volcano-job-readme-example.json").read_text())
    expected["metadata"]["labels"] = {"app.kubernetes.io/part-of": "erw"}  # findable by labels
    expected["spec"]["maxRetry"] = 4  # Volcano counts runs: 3 restarts = 4 runs
    expected["spec"]["policies"] = [
        {"event": "PodEvicted", "action": "RestartJob"},
        {"event": "PodFailed", "action": "RestartJob"},
    ]
    expected["spec"]["ttlSecondsAfterFinished"] = 86400
    for task in expected["spec"]["tasks"]:
        del task["maxRetry"], task["policies"]  # moved to the job: a whole-job restart
        pod = task["template"]["spec"]
        pod["terminationGracePeriodSeconds"] = 600
        pod["securityContext"] = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
        pod["volumes"].append({"name": "scratch", "emptyDir": {}})  # the one writable place: /tmp
        for container in pod["containers"]:
            container["securityContext"] = {
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
                "readOnlyRootFilesystem": True,
            }
            container["volumeMounts"].append({"name": "scratch", "mountPath": "/tmp"})
            # a torchrun restarted in place re-forms its group (erw.training.elastic.RESTART_SAFE_ENV)
            container["env"].insert(0, {"name": "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "value": "1"})
            # `erw torchrun` (exit 143 on preemption), TorchX's arguments unchanged, and torchrun waits
            # the 600 s grace period less 10 s for itself before SIGKILLing its workers
            shell, flag, line = container["command"]
            assert line.startswith("torchrun --rdzv_backend c10d ")
            container["command"] = [
                shell,
                flag,
                "exec erw torchrun --shutdown-timeout 590 " + line.removeprefix("torchrun "),
            ]
    assert job == expected


def test_volcano_job_has_the_requested_topology_resources_and_placement():
    job = dry_run(xl_spec(grace_period_s=900), XL_COMMAND)
    assert job["kind"] == "Job" and job["apiVersion"].startswith("batch.volcano.sh/")
    spec = job["spec"]
    assert spec["queue"] == "erw-training" and spec["schedulerName"] == "volcano"
    assert spec["maxRetry"] == 4 and spec["ttlSecondsAfterFinished"] > 0
    assert job["metadata"]["labels"] == {
        "app.kubernetes.io/part-of": "erw",
        "erw.dev/run-id": "run-42",
        "erw.dev/step": "train",
    }
    assert len(spec["tasks"]) == 2  # one task per node
    for task in spec["tasks"]:
        pod = task["template"]
        (container,) = pod["spec"]["containers"]
        assert container["image"] == "registry.example.com/erw:0.1.0"
        command = " ".join(container["command"])
        assert command.startswith("bash -c exec erw torchrun --shutdown-timeout 890 --rdzv_backend c10d ")  # grace 900
        assert "--nnodes 2 --nproc_per_node 8" in command
        assert "-m erw.cli train --config configs/imagenet256-sit-xl2.yaml --resume auto" in command
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"] == "8"
        assert limits["memory"] == "900000M" and int(requests["memory"].rstrip("M")) > 0
        assert limits["cpu"] == "90000m"
        assert pod["spec"]["nodeSelector"] == {"erw.dev/pool": "h100"}
        assert pod["spec"]["tolerations"] == [GPU_TOLERATION]
        assert pod["spec"]["serviceAccountName"] == "erw-trainer"
        assert pod["spec"]["terminationGracePeriodSeconds"] == 900
        assert (
            pod["metadata"]["labels"]["erw.dev/run-id"] == "run-42"
            and pod["metadata"]["labels"]["erw.dev/step"] == "train"
        )
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["ERW_RUN_ID"] == "run-42" and env["AWS_ENDPOINT_URL"] == "http://minio.kubeflow:9000"
        assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"  # restarts in place re-form (tests/chaos)
        assert container["envFrom"] == [{"secretRef": {"name": "erw-s3", "optional": True}}]
        assert not any("SECRET" in name for name in env)  # credentials only through the Secret
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert [ports[f"metrics-{r}"] for r in range(8)] == list(range(9400, 9408))


def test_pods_run_erw_torchrun_with_the_shutdown_wait_of_their_grace_period():
    from erw.launch.volcano import erw_torchrun_args

    for grace, wait in ((600, 590), (45, 35), (5, 0)):
        (container,) = dry_run(xl_spec(grace_period_s=grace), XL_COMMAND)["spec"]["tasks"][0]["template"]["spec"][
            "containers"
        ]
        assert container["command"][:2] == ["bash", "-c"]
        assert container["command"][2].startswith(f"exec erw torchrun --shutdown-timeout {wait} --rdzv_backend c10d ")
    # TorchX's component rendered otherwise (a TorchX upgrade): refused rather than half rewritten
    with pytest.raises(AssertionError, match="torchrun component changed"):
        erw_torchrun_args("python", ["-m", "torch.distributed.run"], 600)


def test_every_pod_passes_the_restricted_pod_security_level():
    job = dry_run(xl_spec(), XL_COMMAND)
    for task in job["spec"]["tasks"]:
        assert restricted_violations(task["template"]["spec"]) == []
    # and the check can fail: TorchX's own pod, before the launcher adds the security context
    assert len(restricted_violations({"containers": [{"name": "c", "securityContext": {}}]})) == 4


def test_max_restarts_is_counted_the_way_volcano_counts():
    for restarts in (0, 1, 3):
        job = dry_run(xl_spec(max_restarts=restarts), XL_COMMAND)
        # volcano restarting.go: Failed once RetryCount >= maxRetry, RetryCount++ on every RestartJob;
        # and maxRetry 0 would be replaced by 3 by the admission webhook (mutate_job.go).
        assert job["spec"]["maxRetry"] == restarts + 1
        assert {p["action"] for p in job["spec"]["policies"]} == {"RestartJob"}
        assert all("maxRetry" not in task and "policies" not in task for task in job["spec"]["tasks"])


def test_instance_type_capability_becomes_a_node_selector():
    job = dry_run(xl_spec(instance_type="p5.48xlarge", node_selector={}), XL_COMMAND)
    selector = job["spec"]["tasks"][0]["template"]["spec"]["nodeSelector"]
    assert selector == {"node.kubernetes.io/instance-type": "p5.48xlarge"}


def test_cli_dry_run_prints_the_volcano_job(capsys):
    rc = main(
        [
            "launch",
            "--scheduler",
            "kubernetes",
            "--image",
            "erw:test",
            "--nodes",
            "2",
            "--procs-per-node",
            "2",
            "--gpus-per-node",
            "2",
            "--node-selector",
            "pool=gpu",
            "--toleration",
            "nvidia.com/gpu:NoSchedule",
            "--dry-run",
            "--",
            "train",
            "--config",
            str(CONFIGS / "demo.yaml"),
            "encoder.name=none",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "kind: Job" in out and "pool: gpu" in out and "--nnodes 2 --nproc_per_node 2" in out


def test_cli_rejects_a_config_that_cannot_run_at_this_world_size(capsys):
    # demo batch 32 over 3 nodes x 1 process does not split evenly: caught before anything is submitted.
    rc = main(
        [
            "launch",
            "--nodes",
            "3",
            "--dry-run",
            "--",
            "train",
            "--config",
            str(CONFIGS / "demo.yaml"),
            "encoder.name=none",
        ]
    )
    assert rc == 2
    assert "not divisible by world size 3" in capsys.readouterr().err


RANK_JOB = """
import os, sys
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
print(f"hello from rank {rank} of {world}, grace {os.environ.get('ERW_GRACE_PERIOD_S')}", flush=True)
if sys.argv[1:] == ["fail"] and rank == 1:
    raise RuntimeError("rank 1 found no shards under s3://bucket/missing")
if sys.argv[1:2] == ["preempted"]:  # as `erw train` after SIGTERM: checkpointed, exit 143
    print(f"train preempted at step 7: rank {rank}", flush=True)
    sys.exit(143)
if sys.argv[1:2] == ["preempted-once"]:  # the first job is preempted, the next one finishes
    marker = f"preempted-rank-{rank}"
    if not os.path.exists(marker):
        open(marker, "w").close()
        sys.exit(143)
    print(f"rank {rank} continued", flush=True)
"""


@pytest.fixture
def rank_job(tmp_path, monkeypatch):
    # local_cwd runs torchrun in the current directory, where `python -m rank_job` finds this file.
    (tmp_path / "rank_job.py").write_text(textwrap.dedent(RANK_JOB))
    monkeypatch.chdir(tmp_path)
    return LaunchSpec(procs_per_node=2, run_id="local-test")


def test_local_torchrun_job_runs_two_ranks(rank_job):
    out = io.StringIO()
    launch(rank_job, [], module="rank_job", poll_s=0.2, out=out)
    log = out.getvalue()
    # the workers run under `erw torchrun`, told the 600 s grace period less the margins (10 s + 5 s)
    assert "hello from rank 0 of 2, grace 585" in log and "hello from rank 1 of 2, grace 585" in log
    assert "succeeded" in log


def test_local_failing_job_fails_with_the_workers_reason(rank_job):
    with pytest.raises(LaunchError) as err:
        launch(rank_job, ["fail"], module="rank_job", poll_s=0.2, out=io.StringIO())
    message = str(err.value)
    assert "rank 1 exited with code 1" in message
    assert message.splitlines()[0].endswith(
        "rank 1 exited with code 1: RuntimeError: rank 1 found no shards under s3://bucket/missing"
    )


def test_a_preempted_local_job_is_reported_as_preempted(rank_job):
    with pytest.raises(Preempted) as err:
        launch(rank_job, ["preempted"], module="rank_job", poll_s=0.2, out=io.StringIO())
    assert err.value.exit_status == 143
    first = str(err.value).splitlines()[0]
    assert re.fullmatch(
        r"job local_cwd://\S+ was preempted after \S+ \(node 0 got SIGTERM; every rank checkpointed "
        r"and exited 143\)\. The same command with --resume auto continues .*",
        first,
    ), first
    assert "train preempted at step 7: rank 1" in str(err.value)
    assert str(err.value).splitlines()[1] == (
        "No new job was submitted: without --resume auto it would start from step 0."
    )


def test_a_preempted_job_that_resumes_is_submitted_again(rank_job):
    out = io.StringIO()
    launch(rank_job, ["preempted-once", "--resume", "auto"], module="rank_job", poll_s=0.2, out=out)
    log = out.getvalue()
    assert "submitting a new job to continue from the checkpoint (preemption 1 of at most 10)" in log
    assert "rank 0 continued" in log and "rank 1 continued" in log and "succeeded" in log
    # and no further than resubmit_preempted
    for marker in Path().glob("preempted-rank-*"):
        marker.unlink()
    with pytest.raises(Preempted, match=r"No new job was submitted: 0 of resubmit_preempted=0 used"):
        launch(
            rank_job.replace(resubmit_preempted=0),
            ["preempted-once", "--resume", "auto"],
            module="rank_job",
            poll_s=0.2,
            out=io.StringIO(),
        )


def test_local_job_past_its_deadline_is_stopped(tmp_path, monkeypatch):
    (tmp_path / "slow_job.py").write_text("import time\nprint('working', flush=True)\ntime.sleep(60)\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LaunchError, match="did not finish within 3s.*deleted"):
        launch(LaunchSpec(timeout="3s"), [], module="slow_job", poll_s=0.2, out=io.StringIO())


def test_a_failing_training_job_fails_the_pipeline_step(tmp_path, capsys):
    # The KFP step's view: the component runs `erw launch ... -- train ...` and must fail with the reason.
    from components.common import run_erw

    missing = tmp_path / "no-such-dataset"
    with pytest.raises(SystemExit, match="erw launch failed with exit code 2"):
        run_erw(
            [
                "launch",
                "--procs-per-node",
                "2",
                "--timeout",
                "5m",
                "--",
                "train",
                "--config",
                str(CONFIGS / "demo.yaml"),
                "encoder.name=none",
                f"data.shards={missing}",
            ]
        )
    err = capsys.readouterr().err
    assert re.search(
        rf"rank [01] exited with code 2: erw train: error: {re.escape(str(missing))} has no manifest.json", err
    )


def test_failure_report_reads_kubernetes_logs():
    # Kubernetes log lines carry a timestamp before torchrun's "[local_rank]:" prefix.
    from collections import deque

    from torchx.specs import AppState, AppStatus

    from erw.launch import failure_report

    node0 = deque(["2026-01-01T00:00:00Z [0]:train step 10/100 | loss 0.5\n"])
    node1 = deque(
        [
            "2026-01-01T00:00:01Z [3]:train step 10/100 | loss 0.5\n",
            "2026-01-01T00:00:02Z [3]:torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n",
            "2026-01-01T00:00:03Z Root Cause (first observed failure):\n",
            "2026-01-01T00:00:03Z [0]:\n",
            "2026-01-01T00:00:03Z   rank      : 11 (local_rank: 3)\n",
            "2026-01-01T00:00:03Z   exitcode  : 1 (pid: 77)\n",
        ]
    )
    report = failure_report("kubernetes://erw/erw-train-x", AppStatus(AppState.FAILED), [node0, node1], "2h")
    first = report.splitlines()[0]
    assert first == (
        "job kubernetes://erw/erw-train-x failed after 2h: rank 11 exited with code 1: "
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    )
    assert "--- last output of the workers on node 1 ---" in report and "Root Cause" not in report
