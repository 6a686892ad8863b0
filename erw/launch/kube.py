"""The few Kubernetes API calls the launcher makes itself, beside TorchX's create/status/logs:
find a job to re-attach to, delete a job in one request, name the Argo Workflow that owns this
pod, and say why a job is still Pending. Each needs one verb in the `erw-launcher` Role (k8s/base).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erw.launch.spec import LaunchError

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

JOBS = {"group": "batch.volcano.sh", "version": "v1alpha1", "plural": "jobs"}
# Volcano names a job's PodGroup <job>-<job uid>; releases before that used <job>
# (volcano pkg/controllers/job/job_controller_util.go, getPodGroupByJob).
PODGROUPS = {"group": "scheduling.volcano.sh", "version": "v1beta1", "plural": "podgroups"}
# Volcano job phases after which nothing runs again (volcano pkg/apis/batch/v1alpha1 JobPhase).
TERMINAL_PHASES = frozenset({"Completed", "Failed", "Terminated", "Aborted"})
# Argo makes every pod of a workflow a dependent of it (argo-workflows workflow/controller/workflowpod.go).
WORKFLOW_API = ("argoproj.io/v1alpha1", "Workflow")
# The launching pod's namespace, mounted by Kubernetes into every pod with a service account token.
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def api_client() -> ApiClient:
    """In a pod: its service account. Elsewhere: $KUBECONFIG or ~/.kube/config (read now, not at import)."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        path = os.environ.get("KUBECONFIG", "~/.kube/config").split(os.pathsep)[0]
        try:
            config.load_kube_config(config_file=path, client_configuration=configuration)
        except (config.ConfigException, OSError) as err:
            raise LaunchError(
                f"no Kubernetes cluster to submit to: not in a pod, and the kubeconfig {path} cannot be used "
                f"({err}); use --scheduler local_cwd to run here"
            ) from None
    return client.ApiClient(configuration)


def own_pod() -> tuple[str, str] | None:
    """(namespace, name) of the pod this process runs in, or None outside Kubernetes.

    The kubelet sets HOSTNAME to the pod name unless the pod sets spec.hostname (Argo does not).
    """
    try:
        namespace = (SERVICE_ACCOUNT_DIR / "namespace").read_text().strip()
    except OSError:
        return None
    name = os.environ.get("HOSTNAME", "")
    return (namespace, name) if namespace and name else None


def own_namespace() -> str:
    pod = own_pod()
    return pod[0] if pod else "default"


class Cluster:
    """One namespace of one cluster, through the official client."""

    def __init__(self, api: ApiClient, namespace: str) -> None:
        from kubernetes import client

        self.api = api
        self.namespace = namespace
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)

    def active_jobs(self, labels: dict[str, str]) -> list[dict[str, Any]]:
        """Volcano jobs carrying all `labels` that have not finished, newest first."""
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        found = self.custom.list_namespaced_custom_object(namespace=self.namespace, label_selector=selector, **JOBS)
        active = [job for job in found.get("items", []) if job_phase(job) not in TERMINAL_PHASES]
        return sorted(active, key=lambda job: job["metadata"].get("creationTimestamp", ""), reverse=True)

    def delete_job(self, name: str) -> bool:
        """One DELETE, no reads first: on SIGTERM there may be only a second left. False if already gone."""
        from kubernetes.client.rest import ApiException

        try:
            self.custom.delete_namespaced_custom_object(namespace=self.namespace, name=name, **JOBS)
        except ApiException as err:
            if err.status == 404:
                return False
            raise
        return True

    def workflow_owner(self, pod: tuple[str, str] | None) -> dict[str, Any] | None:
        """An ownerReference to the Argo Workflow that owns `pod`, for a job in this namespace.

        Kubernetes only honours an owner in the dependent's own namespace; an owner elsewhere counts
        as missing and the garbage collector would delete the job at once. So: None in that case.
        """
        if pod is None or pod[0] != self.namespace:
            return None
        meta = self.core.read_namespaced_pod(name=pod[1], namespace=pod[0]).metadata
        for ref in meta.owner_references or []:
            if (ref.api_version, ref.kind) == WORKFLOW_API:
                # Not blockOwnerDeletion: that needs update on workflows/finalizers, and nothing must wait.
                return {"apiVersion": ref.api_version, "kind": ref.kind, "name": ref.name, "uid": ref.uid}
        return None

    def pending_reasons(self, job_name: str) -> list[str]:
        """Why a job is not running, in the scheduler's words: PodGroup conditions and Warning events
        on the job, its PodGroup and its pods (FailedCreatePod, FailedScheduling, Unschedulable...)."""
        from kubernetes.client.rest import ApiException

        reasons = []
        try:
            job = self.custom.get_namespaced_custom_object(namespace=self.namespace, name=job_name, **JOBS)
        except ApiException as err:
            if err.status == 404:
                return [f"job {job_name} no longer exists"]
            raise
        group = self._pod_group(job_name, job["metadata"].get("uid", ""))
        if group is not None:
            status = group.get("status", {})
            for cond in status.get("conditions", []):
                if cond.get("status") == "True" and cond.get("type") != "Scheduled":
                    text = ": ".join(filter(None, (cond.get("reason"), cond.get("message"))))
                    reasons.append(f"PodGroup {cond['type']}: {text}")
        events = self.core.list_namespaced_event(namespace=self.namespace, field_selector="type=Warning").items
        ours = [
            e for e in events if e.involved_object.name == job_name or e.involved_object.name.startswith(job_name + "-")
        ]
        ours.sort(key=lambda e: str(e.last_timestamp or e.event_time or ""))
        for event in ours:
            reasons.append(
                f"{event.involved_object.kind} {event.involved_object.name}: {event.reason}: {event.message}"
            )
        return list(dict.fromkeys(reasons))

    def _pod_group(self, job_name: str, job_uid: str) -> dict[str, Any] | None:
        from kubernetes.client.rest import ApiException

        for name in (f"{job_name}-{job_uid}", job_name):
            try:
                return self.custom.get_namespaced_custom_object(namespace=self.namespace, name=name, **PODGROUPS)
            except ApiException as err:
                if err.status != 404:
                    raise
        return None


def is_transient(err: BaseException) -> bool:
    """An API server that is restarting, overloaded or briefly unreachable: worth asking again.
    A 403 or 404 is an answer, not an outage."""
    from kubernetes.client.rest import ApiException
    from urllib3.exceptions import HTTPError

    if isinstance(err, ApiException):
        return err.status in (0, 429) or err.status >= 500  # 0: no HTTP response at all
    return isinstance(err, (HTTPError, OSError))


def api_error(err: BaseException, doing: str, namespace: str) -> LaunchError:
    """A LaunchError saying which call failed and, for a refusal, which permission is missing."""
    from kubernetes.client.rest import ApiException

    if isinstance(err, ApiException) and err.status == 403:
        return LaunchError(
            f"the Kubernetes API refused to {doing} in namespace {namespace} (403 Forbidden): the service "
            "account running `erw launch` needs the Role erw-launcher from k8s/base bound to it "
            "(docs/cluster.md lists the `kubectl auth can-i` checks)"
        )
    if isinstance(err, ApiException):
        return LaunchError(f"the Kubernetes API failed to {doing} in namespace {namespace}: {err.status} {err.reason}")
    return LaunchError(f"could not reach the Kubernetes API to {doing}: {err}")


def age_s(obj: dict[str, Any]) -> float:
    """Seconds since the object was created (0 if the clocks disagree)."""
    from datetime import datetime, timezone

    created = datetime.fromisoformat(obj["metadata"]["creationTimestamp"].replace("Z", "+00:00"))
    return max(0.0, (datetime.now(timezone.utc) - created).total_seconds())


def job_phase(job: dict[str, Any]) -> str:
    return job.get("status", {}).get("state", {}).get("phase", "Pending")
