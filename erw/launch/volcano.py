"""What gets submitted: the TorchX AppDef of a launch, and the Volcano job TorchX renders from it
with the settings TorchX has no option for (labels to find it again, owner, TTL, restart budget,
grace period, Pod Security).

Volcano facts relied on here were read in volcano-sh/volcano (see README, "verified against source").
"""

from __future__ import annotations

import copy
import os
import re
import sys
from typing import TYPE_CHECKING, Any

from erw.launch.spec import LaunchSpec, label_value
from erw.training.elastic import RESTART_SAFE_ENV, agent_shutdown_timeout_s

if TYPE_CHECKING:
    from torchx.specs import AppDef

ROLE = "trainer"  # TorchX role name: pods are <job>-trainer-<node>-0, Volcano exports VC_TRAINER_0_HOSTS
PART_OF = ("app.kubernetes.io/part-of", "erw")  # on the job and its pods; the PodMonitor selects on it
RUN_ID_LABEL = "erw.dev/run-id"
STEP_LABEL = "erw.dev/step"
INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"  # the one nodeSelector TorchX maps from capabilities
# Cluster-wide settings the job inherits from the launching step. Credentials are deliberately
# absent: they reach the job through the Kubernetes Secret (envFrom) or the service account (IRSA).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")
# Volcano deletes a finished job (and with it its pods, Service, ConfigMap, NetworkPolicy) after this.
# The launcher has already copied the logs into the step's log; a day leaves time to look at the pods.
FINISHED_JOB_TTL_S = 24 * 3600
# Any pod failing or being evicted restarts the whole job (torchrun ranks cannot rejoin alone);
# `maxRetry` bounds how often (LaunchSpec.volcano_max_retry).
RESTART_POLICIES = [{"event": "PodEvicted", "action": "RestartJob"}, {"event": "PodFailed", "action": "RestartJob"}]
# Kubernetes Pod Security Standard "restricted": the image runs as UID 1000 and needs nothing more.
# The root filesystem is read-only; the one writable place is SCRATCH (torchrun's error files,
# compile caches: the image points its caches there), a per-pod emptyDir.
POD_SECURITY_CONTEXT = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY_CONTEXT = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": True,
}
SCRATCH = {"name": "scratch", "mountPath": "/tmp"}


def job_name_prefix(spec: LaunchSpec, command: list[str]) -> str:
    return spec.name or f"erw-{command[0] if command else 'job'}"


def name_problems(spec: LaunchSpec, command: list[str]) -> list[str]:
    """Pod names are <job>-<TorchX's random id, up to 14>-trainer-<node>-0 and must fit in 63
    characters (TorchX checks this only with validate_spec, which needs an API server)."""
    if spec.scheduler != "kubernetes":
        return []
    longest = len(normalize_name(job_name_prefix(spec, command))) + 1 + 14 + len(f"-{ROLE}-{spec.nodes - 1}-0")
    if longest > 63:
        return [
            f"name {job_name_prefix(spec, command)!r} is too long: pod names would reach {longest} characters (max 63)"
        ]
    return []


def normalize_name(text: str) -> str:
    """What TorchX makes of a job name (torchx.util.strings.normalize_str)."""
    return re.sub(r"[^a-z0-9-]", "", text.lower()).lstrip("-")


def job_step(spec: LaunchSpec, command: list[str]) -> str:
    """The step label: the spec's, else the erw command (warmup|train)."""
    return spec.step or label_value(command[0] if command else "job")


def job_labels(spec: LaunchSpec, command: list[str]) -> dict[str, str]:
    """Labels of the Volcano job that identify it: a retried launcher finds its job by these."""
    labels = dict([PART_OF])
    if spec.run_id:
        labels[RUN_ID_LABEL] = label_value(spec.run_id)
        labels[STEP_LABEL] = job_step(spec, command)
    return labels


def build_app(spec: LaunchSpec, command: list[str], module: str = "erw.cli") -> AppDef:
    """The TorchX AppDef: `erw torchrun` of `python -m <module> <command>` on every node."""
    from torchx.components.dist import torchrun
    from torchx.specs.overlays import JOIN, set_overlay

    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    env.update(RESTART_SAFE_ENV)  # a torchrun restarted in place re-forms its group (see erw.training.elastic)
    env.update(spec.env)
    if spec.run_id:
        env["ERW_RUN_ID"] = spec.run_id
    if spec.scheduler == "local_cwd":
        # erw (for `erw torchrun`) must be this interpreter's: the caller's PATH may not include the venv.
        env["PATH"] = os.path.dirname(sys.executable)
    app = torchrun(
        *command,
        m=module,
        image=spec.image or "local",
        name=job_name_prefix(spec, command),
        cpu=spec.cpus_per_node,
        gpu=spec.gpus_per_node,
        memMB=spec.memory_mb,
        j=f"{spec.nodes}x{spec.procs_per_node}",
        env=env,
        max_retries=spec.max_restarts if spec.scheduler == "local_cwd" else 0,  # Volcano's: see volcano_job
    )
    role = app.roles[0]
    role.name = ROLE
    role.args = erw_torchrun_args(role.entrypoint, role.args, spec.grace_period_s)
    if spec.instance_type:
        role.resource.capabilities[INSTANCE_TYPE_LABEL] = spec.instance_type
    for rank in range(spec.procs_per_node if spec.metrics_port else 0):
        role.port_map[f"metrics-{rank}"] = spec.metrics_port + rank
    pod: dict[str, Any] = {"spec": {}, "metadata": {"labels": job_labels(spec, command)}}
    if spec.node_selector:
        pod["spec"]["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["spec"]["tolerations"] = [dict(t) for t in spec.tolerations]
    if spec.s3_secret:
        # TorchX maps env to plain values only; the one container is matched by its image to add envFrom.
        pod["spec"][JOIN("containers", on="image")] = [
            {"image": role.image, "envFrom": [{"secretRef": {"name": spec.s3_secret, "optional": True}}]}
        ]
    set_overlay(role, "kubernetes", "V1Pod", pod)
    return app


def erw_torchrun_args(entrypoint: str, args: list[str], grace_period_s: int) -> list[str]:
    """TorchX's `bash -c "torchrun ..."` as `bash -c "exec erw torchrun --shutdown-timeout T ..."`.

    The same arguments (TorchX's rendezvous, nnodes, nproc_per_node, tee, role; bash expands the
    rank-0 host), but the exit status tells a preemption (143) from a failure (1), and torchrun
    waits the pod's grace period (less a margin to exit itself) before SIGKILLing its workers
    instead of its default 30 s. exec: the pod's SIGTERM goes to the container's first process,
    which must be torchrun, not a shell that would wait for it.
    """
    shell_flag, command = args if len(args) == 2 else ("", "")
    if entrypoint != "bash" or shell_flag != "-c" or not command.startswith("torchrun "):
        raise AssertionError(
            f"TorchX's torchrun component changed: {entrypoint} {args}; erw_torchrun_args needs an update"
        )
    timeout = agent_shutdown_timeout_s(grace_period_s)
    return [shell_flag, f"exec erw torchrun --shutdown-timeout {timeout} {command.removeprefix('torchrun ')}"]


def scheduler_cfg(spec: LaunchSpec, namespace: str) -> dict[str, Any]:
    if spec.scheduler == "local_cwd":
        return {}
    cfg: dict[str, Any] = {
        "queue": spec.queue,
        "namespace": namespace,
        # The API server validates the job when it is created; a dry run must work without one.
        "validate_spec": False,
    }
    if spec.service_account:
        cfg["service_account"] = spec.service_account
    if spec.priority_class:
        cfg["priority_class"] = spec.priority_class
    return cfg


def volcano_job(
    rendered: dict[str, Any], spec: LaunchSpec, command: list[str], owner: dict[str, Any] | None = None
) -> dict[str, Any]:
    """TorchX's Volcano job (as plain data) plus what TorchX has no option for. Returns a new dict.

    owner: an ownerReference (the Argo Workflow of the KFP run), so deleting the run deletes the job.
    """
    job = copy.deepcopy(rendered)
    meta = job["metadata"]
    meta.setdefault("labels", {}).update(job_labels(spec, command))
    if owner:
        meta["ownerReferences"] = [owner]
    body = job["spec"]
    body["ttlSecondsAfterFinished"] = FINISHED_JOB_TTL_S
    body["maxRetry"] = spec.volcano_max_retry
    body["policies"] = copy.deepcopy(RESTART_POLICIES)
    for task in body["tasks"]:
        # A task's own maxRetry/policies would restart single pods, which torchrun cannot use.
        task.pop("maxRetry", None)
        task.pop("policies", None)
        pod = task["template"]["spec"]
        pod["terminationGracePeriodSeconds"] = spec.grace_period_s
        pod["securityContext"] = {**pod.get("securityContext", {}), **POD_SECURITY_CONTEXT}
        pod.setdefault("volumes", []).append({"name": SCRATCH["name"], "emptyDir": {}})
        for container in pod["containers"]:
            container["securityContext"] = {**container.get("securityContext", {}), **CONTAINER_SECURITY_CONTEXT}
            container.setdefault("volumeMounts", []).append(dict(SCRATCH))
    return job
