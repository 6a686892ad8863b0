"""The launched job's lifecycle on Kubernetes, against an API server that speaks HTTP (tests/kube_fake.py)
to the real `kubernetes` client and TorchX's real kubernetes scheduler: re-attach instead of a second
job, one direct DELETE on SIGTERM, the Workflow as owner, the scheduler's reasons when Pending."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tests.kube_fake import FakeKube, Server

from erw.launch import LaunchError, LaunchSpec, Preempted, kube, launch
from erw.training.elastic import PREEMPTION_REPORT

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "team-a"
COMMAND = ["train", "--config", "configs/demo.yaml"]
WORKFLOW_OWNER = {
    "apiVersion": "argoproj.io/v1alpha1",
    "kind": "Workflow",
    "name": "erw-pipeline-x7k2p",
    "uid": "0c6b-wf-uid",
    "controller": True,
    "blockOwnerDeletion": True,
}
LABELS = {"app.kubernetes.io/part-of": "erw", "erw.dev/run-id": "run-42", "erw.dev/step": "train"}


def spec(**changes) -> LaunchSpec:
    base = LaunchSpec(
        scheduler="kubernetes",
        image="erw:test",
        queue="erw",
        namespace=NAMESPACE,
        nodes=2,
        procs_per_node=1,
        run_id="run-42",
        grace_period_s=900,
    )
    return base.replace(**changes)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake API on 127.0.0.1 reached through $KUBECONFIG; this process is not in a pod."""
    api = FakeKube()
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # never the in-cluster config of a real cluster
    monkeypatch.setattr(kube, "SERVICE_ACCOUNT_DIR", tmp_path / "not-in-a-pod")
    with Server(api, tmp_path) as kubeconfig:
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        yield api


def in_launcher_pod(api: FakeKube, tmp_path: Path, monkeypatch, namespace: str = NAMESPACE) -> None:
    """As in a KFP step: the service account's namespace file, HOSTNAME = pod name, Argo's owner on the pod."""
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "namespace").write_text(namespace)
    monkeypatch.setattr(kube, "SERVICE_ACCOUNT_DIR", account)
    monkeypatch.setenv("HOSTNAME", "erw-pipeline-x7k2p-system-container-impl-123")
    api.add_pod(
        namespace,
        "erw-pipeline-x7k2p-system-container-impl-123",
        labels={"workflows.argoproj.io/workflow": "erw-pipeline-x7k2p"},
        owners=[WORKFLOW_OWNER],
    )


def test_submitted_job_is_owned_by_the_workflow_labelled_and_bounded(fake, tmp_path, monkeypatch):
    in_launcher_pod(fake, tmp_path, monkeypatch)
    fake.default_log = ["2026-01-01T00:00:01.5Z [0]:train step 1/2", "2026-01-01T00:00:02Z [0]:train step 2/2"]
    out = io.StringIO()
    launch(spec(), COMMAND, poll_s=0.05, out=out)
    (job,) = fake.created
    meta, body = job["metadata"], job["spec"]
    assert meta["ownerReferences"] == [
        {"apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow", "name": "erw-pipeline-x7k2p", "uid": "0c6b-wf-uid"}
    ]  # no blockOwnerDeletion: it would need update on workflows/finalizers
    assert meta["labels"] == LABELS
    assert body["ttlSecondsAfterFinished"] > 0 and body["maxRetry"] == 1
    for task in body["tasks"]:
        pod = task["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] == 900
        assert pod["securityContext"]["runAsNonRoot"] is True
    log = out.getvalue()
    assert "owned by Workflow erw-pipeline-x7k2p" in log and "succeeded" in log
    assert log.count("[node 1] 2026-01-01T00:00:02Z [0]:train step 2/2") == 1  # streams re-opened, lines not repeated


def test_no_owner_reference_across_namespaces(fake, tmp_path, monkeypatch):
    # Kubernetes treats an owner in another namespace as absent: the garbage collector would delete the job.
    in_launcher_pod(fake, tmp_path, monkeypatch, namespace="kubeflow")
    launch(spec(), COMMAND, poll_s=0.05, out=io.StringIO())
    (job,) = fake.created
    assert "ownerReferences" not in job["metadata"]


def test_a_second_launch_for_the_same_run_and_step_reattaches(fake):
    fake.add_job(NAMESPACE, "erw-train-old", LABELS, "Completed")  # an earlier attempt that finished: ignored
    fake.add_job(NAMESPACE, "erw-warmup-abc", {**LABELS, "erw.dev/step": "warmup"}, "Running")  # another step
    fake.add_job(NAMESPACE, "erw-other-run", {**LABELS, "erw.dev/run-id": "run-41"}, "Running")  # another run
    fake.add_job(NAMESPACE, "erw-train-live", LABELS, "Running", phases=["Running", "Completed"])
    fake.logs["erw-train-live-trainer-0-0"] = ["2026-01-01T00:00:03Z [0]:still training from the first launcher"]
    out = io.StringIO()
    launch(spec(), COMMAND, poll_s=0.05, out=out)
    assert fake.created == []  # no second job
    log = out.getvalue()
    assert "re-attaching to kubernetes://torchx/team-a:erw-train-live, still Running" in log
    assert "still training from the first launcher" in log and "succeeded" in log
    assert {"erw-warmup-abc", "erw-other-run", "erw-train-old"} <= {name for _, name in fake.jobs}


def test_without_a_run_id_every_launch_is_a_new_job(fake):
    fake.add_job(NAMESPACE, "erw-train-live", {"app.kubernetes.io/part-of": "erw"}, "Running")
    launch(spec(run_id=""), COMMAND, poll_s=0.05, out=io.StringIO())
    assert len(fake.created) == 1
    assert not any(method == "GET" and path.endswith("/jobs") for method, path in fake.requests)  # no lookup


def test_pending_past_the_timeout_fails_with_the_schedulers_reasons(fake):
    fake.phases = ["Pending"]  # never scheduled

    def scheduler_says(job):
        name, uid = job["metadata"]["name"], job["metadata"]["uid"]
        fake.podgroups[(NAMESPACE, f"{name}-{uid}")] = {
            "status": {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "Unschedulable",
                        "status": "True",
                        "reason": "NotEnoughResources",
                        "message": "2/2 tasks in gang unschedulable: pod group is not ready, 2 Pending, 2 minAvailable",
                    }
                ],
            }
        }
        fake.add_event(
            NAMESPACE,
            "Pod",
            f"{name}-trainer-0-0",
            "FailedScheduling",
            "0/3 nodes are unavailable: 3 Insufficient nvidia.com/gpu.",
        )
        fake.add_event(NAMESPACE, "Pod", "someone-elses-pod", "FailedScheduling", "not ours")
        fake.add_event(NAMESPACE, "Job", name, "Normal", "created", type_="Normal")

    fake.on_create = scheduler_says
    out = io.StringIO()
    with pytest.raises(LaunchError) as err:
        launch(spec(pending_timeout="1s"), COMMAND, poll_s=0.1, out=out)
    message = str(err.value)
    (job,) = fake.created
    name = job["metadata"]["name"]
    assert f"job kubernetes://torchx/team-a:{name} was still Pending after 1s; it was deleted" in message
    assert "PodGroup Unschedulable: NotEnoughResources: 2/2 tasks in gang unschedulable" in message
    assert (
        f"Pod {name}-trainer-0-0: FailedScheduling: 0/3 nodes are unavailable: 3 Insufficient nvidia.com/gpu."
        in message
    )
    assert "not ours" not in message and "created" not in message
    assert out.getvalue().count("erw launch: pending: PodGroup Unschedulable") == 1  # printed once, when first seen
    assert (NAMESPACE, name) not in fake.jobs and (
        "DELETE",
        f"/apis/batch.volcano.sh/v1alpha1/namespaces/{NAMESPACE}/jobs/{name}",
    ) in fake.requests


def test_sigterm_deletes_the_job_with_one_direct_request(fake, tmp_path):
    """The real CLI in its own process, as in a KFP step: SIGTERM -> DELETE, no status reads first."""
    fake.phases = ["Pending", "Running"]  # then Running for ever
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "erw.cli",
            "launch",
            "--scheduler",
            "kubernetes",
            "--image",
            "erw:test",
            "--queue",
            "erw",
            "--namespace",
            NAMESPACE,
            "--nodes",
            "2",
            "--run-id",
            "run-9",
            "--",
            "train",
            "--config",
            str(ROOT / "configs" / "demo.yaml"),
            "encoder.name=none",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(2400):  # up to 2 min on a loaded machine, until the launcher has read the Running job
            with fake.lock:
                running = [j for j in fake.jobs.values() if j["status"]["state"]["phase"] == "Running"]
                reads = [p for m, p in fake.requests if p.endswith("/status")]
            if running and len(reads) >= 2:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        (job,) = running
        name = job["metadata"]["name"]
        with fake.lock:
            before = len(fake.requests)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err  # stopped from outside, as its pods: the step's retry continues the run
    assert "erw launch: error: stopped by SIGTERM; the job was deleted" in err
    after = [(m, p) for m, p in fake.requests[before:] if f"/jobs/{name}" in p]
    assert after[0] == ("DELETE", f"/apis/batch.volcano.sh/v1alpha1/namespaces/{NAMESPACE}/jobs/{name}"), after
    assert (NAMESPACE, name) not in fake.jobs
    assert f"erw launch: deleting kubernetes://torchx/{NAMESPACE}:{name}" in out


API_PATH = re.compile(
    r"^/apis?/(?:(?P<group>[^/]+)/)?v[^/]+/namespaces/[^/]+/(?P<resource>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?$"
)


def rbac_verb(method: str, path: str) -> tuple[str, str, str]:
    """(apiGroup, resource[/subresource], verb) that Kubernetes authorizes for one request."""
    match = API_PATH.match(path)
    group = match["group"] if path.startswith("/apis/") else ""
    resource = match["resource"] + (f"/{match['sub']}" if match["sub"] else "")
    verb = {"POST": "create", "DELETE": "delete", "GET": "get" if match["name"] else "list"}[method]
    return group, resource, verb


def test_the_launcher_role_grants_exactly_what_the_launcher_uses(fake, tmp_path, monkeypatch):
    """Every request of a launch (submit from a KFP pod, Pending diagnostics, logs, re-attach lookup,
    delete) is allowed by the erw-launcher Role in k8s/base, and the Role allows nothing else."""
    in_launcher_pod(fake, tmp_path, monkeypatch)
    fake.phases = ["Pending", "Pending", "Running", "Completed"]
    fake.default_log = ["2026-01-01T00:00:01Z [0]:hello"]
    launch(spec(), COMMAND, poll_s=0.05, out=io.StringIO())
    fake.phases = ["Pending"]
    with pytest.raises(LaunchError, match="still Pending"):
        launch(spec(run_id="run-43", pending_timeout="0.2s"), COMMAND, poll_s=0.05, out=io.StringIO())
    used = {rbac_verb(method, path) for method, path in fake.requests}

    (role,) = [d for d in yaml.safe_load_all((ROOT / "k8s" / "base" / "rbac.yaml").read_text()) if d["kind"] == "Role"]
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert used <= granted, f"requests the Role forbids: {sorted(used - granted)}"
    assert granted <= used, f"verbs the Role grants that nothing uses: {sorted(granted - used)}"


def test_an_api_outage_is_waited_out_not_taken_for_a_failed_job(fake):
    # An API server restart must not end (and delete) a job that may have trained for days.
    outage = {"left": 3}

    def unavailable(method, path):
        if path.endswith("/status") and outage["left"]:
            outage["left"] -= 1
            return 503
        return None

    fake.refuse = unavailable
    out = io.StringIO()
    launch(spec(), COMMAND, poll_s=0.05, out=out)
    log = out.getvalue()
    assert "the Kubernetes API did not answer" in log and "answers again" in log and "succeeded" in log
    assert not any(method == "DELETE" for method, _ in fake.requests)


def test_a_missing_permission_is_named(fake):
    fake.refuse = lambda method, path: 403 if method == "GET" and path.endswith("/jobs") else None
    with pytest.raises(LaunchError) as err:
        launch(spec(), COMMAND, poll_s=0.05, out=io.StringIO())
    message = str(err.value)
    assert "refused to list Volcano jobs in namespace team-a (403 Forbidden)" in message
    assert "Role erw-launcher from k8s/base" in message
    assert fake.created == []


def test_no_cluster_configuration_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    with pytest.raises(LaunchError, match="no Kubernetes cluster to submit to.*--scheduler local_cwd"):
        launch(spec(), COMMAND, poll_s=0.05, out=io.StringIO())


def test_the_deadline_is_the_jobs_not_the_launchers(fake):
    # A retried launcher does not grant the job a fresh --timeout: it counts from the job's creation.
    fake.add_job(NAMESPACE, "erw-train-old", LABELS, "Running", age_s=80 * 3600)
    with pytest.raises(LaunchError, match="did not finish within 72h"):
        launch(spec(timeout="72h"), COMMAND, poll_s=0.05, out=io.StringIO())
    assert (NAMESPACE, "erw-train-old") not in fake.jobs  # and it was deleted


@pytest.mark.parametrize(
    "node0_end, preempted",
    [
        (f"{PREEMPTION_REPORT}; exit status 143", True),
        ("erw torchrun: failed: worker 0 exited 1; exit status 1", False),
    ],
)
def test_a_job_ended_by_a_preemption_is_reported_as_one(fake, node0_end, preempted):
    # Node 0's pod got SIGTERM (its ranks checkpointed and exited 143); node 1's ranks lost their
    # peers and failed. The preemption is the cause: `erw launch` exits 143. Without it, a failure.
    fake.phases = ["Running", "Running", "Failed"]

    def pod_logs(job):
        name = job["metadata"]["name"]
        fake.logs[f"{name}-trainer-0-0"] = [
            "2026-01-01T00:00:01Z [0]:train step 7/100",
            "2026-01-01T00:00:02Z [0]:train preempted at step 8",
            f"2026-01-01T00:00:03Z {node0_end}",
        ]
        fake.logs[f"{name}-trainer-1-0"] = [
            "2026-01-01T00:00:01Z [0]:train step 7/100",
            "2026-01-01T00:00:02Z [0]:RuntimeError: Connection reset by peer",
            "2026-01-01T00:00:03Z erw torchrun: failed: worker 0 exited 1; exit status 1",
        ]

    fake.on_create = pod_logs
    with pytest.raises(LaunchError) as err:
        launch(spec(), COMMAND, poll_s=0.05, out=io.StringIO())
    assert isinstance(err.value, Preempted) == preempted
    assert err.value.exit_status == (143 if preempted else 2)
    first = str(err.value).splitlines()[0]
    if preempted:
        assert "was preempted after" in first and "(node 0 got SIGTERM; every rank checkpointed" in first
        assert "train preempted at step 8" in str(err.value)
    else:
        assert "failed after" in first and "Connection reset by peer" in first


def test_a_preempted_job_is_submitted_again_and_the_new_one_finishes(fake):
    fake.phases = ["Running", "Running", "Failed"]

    def pod_logs(job):
        name = job["metadata"]["name"]
        if len(fake.created) == 1:  # both nodes preempted: every rank checkpointed
            for node in (0, 1):
                fake.logs[f"{name}-trainer-{node}-0"] = [
                    "2026-01-01T00:00:02Z [0]:train preempted at step 8",
                    f"2026-01-01T00:00:03Z {PREEMPTION_REPORT}; exit status 143",
                ]
        else:
            fake.set_phases(NAMESPACE, name, ["Running", "Completed"])
            for node in (0, 1):
                fake.logs[f"{name}-trainer-{node}-0"] = ["2026-01-01T01:00:00Z [0]:train finished at step 100"]

    fake.on_create = pod_logs
    out = io.StringIO()
    launch(spec(), [*COMMAND, "--resume", "auto"], poll_s=0.05, out=out)
    assert len(fake.created) == 2
    log = out.getvalue()
    assert "submitting a new job to continue from the checkpoint (preemption 1 of at most 10)" in log
    assert "train finished at step 100" in log and "succeeded" in log
