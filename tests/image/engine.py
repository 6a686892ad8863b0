"""Running the built image here as Kubernetes would run it: a container engine (podman, or Docker
when a daemon answers), and Kubernetes pod specs turned into the engine's `run` flags.

What a pod spec says is applied or refused, never silently dropped: command and args, env and
envFrom (Secrets the test provides), the volumes (emptyDir as tmpfs; Volcano's svc ConfigMap as a
read-only folder), the user rules (runAsNonRoot checked against the image's numeric USER), no
privilege escalation, dropped capabilities, a read-only root filesystem. Resource limits are not
applied (this machine has 2 cores; cgroup limits are the kubelet's business, not the image's).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("ERW_TEST_IMAGE", "localhost/erw:dev")
CONTAINERS_CONF = REPO / "container" / "containers.conf"


class Engine:
    """The container CLI: podman with the project's settings, or docker."""

    def __init__(self) -> None:
        if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
            self.cli, self.env = "docker", dict(os.environ)
        elif shutil.which("podman"):
            self.cli = "podman"
            self.env = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(CONTAINERS_CONF))}
        else:
            raise RuntimeError("no container engine: `make test-image` installs podman (or start a Docker daemon)")

    def __call__(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.cli, *args], env=self.env, capture_output=True, text=True, check=check, timeout=timeout
        )

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [self.cli, *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    def image_config(self, image: str) -> dict:
        return json.loads(self("image", "inspect", image).stdout)[0]["Config"]

    @property
    def read_only(self) -> list[str]:
        """A read-only root filesystem and nothing writable but the volumes (podman would add
        tmpfs at /tmp, /var/tmp and /run: a pod gets none of them)."""
        return ["--read-only", "--read-only-tmpfs=false"] if self.cli == "podman" else ["--read-only"]


@dataclass
class Pod:
    """One pod of a Volcano job as Volcano and the kubelet make it: its name (the host name), its
    address (each pod gets its own loopback address: 127.0.0.2, .3, ...), its /etc/hosts (the kubelet
    writes `IP FQDN hostname`; the other pods' names stand in for the cluster DNS) and the env and
    files of Volcano's svc and env plugins (volcano-sh/volcano pkg/controllers/job/plugins)."""

    name: str
    subdomain: str
    address: str
    task: dict
    hosts_file: Path | None = None
    config_map: Path | None = None  # Volcano's svc ConfigMap, mounted at /etc/volcano
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{self.subdomain}"


def volcano_pods(job: dict, workdir: Path, namespace: str = "erw") -> list[Pod]:
    """The pods Volcano makes of a job (TorchX renders one task per replica): host names
    `<job>-<task>-0.<job>`, VC_<TASK>_HOSTS / VC_<TASK>_NUM and the ConfigMap of hosts at /etc/volcano
    (svc plugin), VC_TASK_INDEX (env plugin)."""
    name, tasks = job["metadata"]["name"], job["spec"]["tasks"]
    plugins = job["spec"].get("plugins", {})
    assert set(plugins) <= {"svc", "env"}, f"a Volcano plugin these tests do not emulate: {plugins}"
    pods = []
    for i, task in enumerate(tasks):
        assert task.get("replicas", 1) == 1, "TorchX renders one task per replica"
        pods.append(Pod(f"{name}-{task['name']}-0", name, f"127.0.0.{2 + i}", task))
    svc_env, config_map = {}, workdir / f"{name}-svc"
    config_map.mkdir(parents=True, exist_ok=True)
    for pod in pods:
        key = pod.task["name"].replace("-", "_")
        svc_env[f"VC_{key.upper()}_HOSTS"] = pod.fqdn
        svc_env[f"VC_{key.upper()}_NUM"] = "1"
        (config_map / f"{key}.host").write_text(pod.fqdn)
    domain = f"{namespace}.svc.cluster.local"
    for pod in pods:
        lines = ["127.0.0.1\tlocalhost"]
        for other in pods:
            names = [f"{other.fqdn}.{domain}", other.name] if other is pod else [f"{other.fqdn}.{domain}"]
            lines.append("\t".join([other.address, *names, other.fqdn]))
        pod.hosts_file = workdir / f"{pod.name}.hosts"
        pod.hosts_file.write_text("\n".join(lines) + "\n")
        pod.hosts_file.chmod(0o644)
        if "svc" in plugins:
            pod.config_map = config_map
            pod.extra_env.update(svc_env)
        if "env" in plugins:
            pod.extra_env["VC_TASK_INDEX"] = "0"
    return pods


def pod_flags(engine: Engine, pod: Pod, secrets: dict[str, dict[str, str]]) -> list[str]:
    """`run` flags for one pod: everything its spec says, or an AssertionError naming what these
    tests cannot emulate."""
    spec = pod.task["template"]["spec"]
    (container,) = spec["containers"]
    flags = ["--name", pod.name, "--hostname", pod.name, "-v", f"{pod.hosts_file}:/etc/hosts:ro"]
    for var in container.get("env", []):
        assert set(var) == {"name", "value"}, f"env other than plain values is not emulated: {var}"
        flags += ["-e", f"{var['name']}={var['value']}"]
    for source in container.get("envFrom", []):
        ref = source["secretRef"]
        if ref["name"] in secrets:
            flags += [f"-e{k}={v}" for k, v in secrets[ref["name"]].items()]
        else:
            assert ref.get("optional"), f"Secret {ref['name']} is missing and not optional: the pod would not start"
    flags += [f"-e{k}={v}" for k, v in pod.extra_env.items()]

    pod_security, security = spec.get("securityContext", {}), container.get("securityContext", {})
    user = security.get("runAsUser", pod_security.get("runAsUser"))
    if security.get("runAsNonRoot", pod_security.get("runAsNonRoot")):
        # The kubelet's rule: the user must be known to be non-root, i.e. numeric and not 0.
        image_user = str(user) if user is not None else engine.image_config(container["image"]).get("User", "")
        uid = image_user.split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"runAsNonRoot and image USER {image_user!r}: the kubelet refuses it"
    if user is not None:
        flags += ["--user", str(user)]
    if security.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    for cap in security.get("capabilities", {}).get("drop", []):
        flags += ["--cap-drop", cap]
    if security.get("readOnlyRootFilesystem"):
        flags += engine.read_only

    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        assert set(volume) == {"name", "emptyDir"}, f"a volume kind these tests do not emulate: {volume}"
        flags += ["--tmpfs", f"{mount['mountPath']}:rw,mode=1777"]
    if pod.config_map is not None:
        flags += ["-v", f"{pod.config_map}:/etc/volcano:ro"]

    if container.get("command"):
        # Kubernetes: `command` replaces the image's ENTRYPOINT and `args` its CMD.
        flags += ["--entrypoint", json.dumps(container["command"])]
    return [*flags, container["image"], *container.get("args", [])]
