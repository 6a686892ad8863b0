"""The Kubernetes Pod Security Standard `restricted`, as the checks a pod of this project could fail
(k8s.io/pod-security-admission policy/check_*.go: allowPrivilegeEscalation, capabilities,
runAsNonRoot, runAsUser, seccompProfile, privileged, volume types, host namespaces)."""

from __future__ import annotations

RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def restricted_violations(pod_spec: dict) -> list[str]:
    """Every reason the `restricted` level would refuse a pod with this spec; [] when it passes."""
    out = []
    pod_ctx = pod_spec.get("securityContext", {})
    for c in pod_spec.get("initContainers", []) + pod_spec["containers"]:
        ctx = c.get("securityContext", {})
        caps = ctx.get("capabilities", {})
        if ctx.get("allowPrivilegeEscalation") is not False:
            out.append(f"{c['name']}: allowPrivilegeEscalation must be false")
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{c['name']}: capabilities must drop ALL and add nothing but NET_BIND_SERVICE")
        if ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is not True:
            out.append(f"{c['name']}: runAsNonRoot must be true")
        if ctx.get("runAsUser", pod_ctx.get("runAsUser")) == 0:
            out.append(f"{c['name']}: runAsUser must not be 0")
        if ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {})).get("type") not in (
            "RuntimeDefault",
            "Localhost",
        ):
            out.append(f"{c['name']}: seccompProfile must be RuntimeDefault or Localhost")
        if ctx.get("privileged"):
            out.append(f"{c['name']}: privileged")
    for volume in pod_spec.get("volumes", []):
        if not set(volume) - {"name"} <= RESTRICTED_VOLUMES:
            out.append(f"volume {volume['name']}: type not allowed")
    if pod_spec.get("hostNetwork") or pod_spec.get("hostPID") or pod_spec.get("hostIPC"):
        out.append("host namespaces")
    return out
