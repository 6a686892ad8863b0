"""k8s/monitoring agrees with what runs: the PodMonitor selects the pods `erw launch` submits
through TorchX and scrapes every rank's port; the Pushgateway is scraped with honorLabels."""

from __future__ import annotations

from pathlib import Path

import yaml

from erw.launch import LaunchSpec, dry_run

MONITORING = Path(__file__).parents[1] / "k8s" / "monitoring"


def resources() -> dict[str, dict]:
    """kind/name -> manifest, for every file the kustomization lists."""
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    found = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((MONITORING / name).read_text()):
            found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return found


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"]) | {"kustomization.yaml"}
    for generator in kustomization["configMapGenerator"]:
        listed |= {entry.split("=")[-1] for entry in generator["files"]}
    assert {p.name for p in MONITORING.iterdir()} == listed


def test_podmonitor_scrapes_every_rank_of_a_launched_job():
    base_port, ranks = 9400, 8
    spec = LaunchSpec(
        scheduler="kubernetes",
        queue="erw",
        namespace="ml",
        nodes=2,
        procs_per_node=ranks,
        gpus_per_node=ranks,
        image="registry.example.com/erw:test",
        metrics_port=base_port,
        run_id="monitoring-test",
    )
    job = dry_run(spec, ["train", "--config", "configs/demo.yaml"])
    monitor = resources()["PodMonitor/erw-training"]["spec"]
    endpoints = {e["port"] for e in monitor["podMetricsEndpoints"]}
    for task in job["spec"]["tasks"]:
        pod = task["template"]
        labels = pod["metadata"]["labels"]
        assert monitor["selector"]["matchLabels"].items() <= labels.items(), labels
        assert set(monitor["podTargetLabels"]) <= set(labels)
        (container,) = pod["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        metrics_ports = {name: port for name, port in ports.items() if name.startswith("metrics-")}
        assert metrics_ports == {f"metrics-{r}": base_port + r for r in range(ranks)}
        assert set(metrics_ports) <= endpoints


def test_pushgateway_is_scraped_with_honor_labels():
    found = resources()
    service = found["Service/erw-pushgateway"]
    deployment = found["Deployment/erw-pushgateway"]
    monitor = found["ServiceMonitor/erw-pushgateway"]["spec"]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["endpoints"]
    assert endpoint["honorLabels"] is True
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}


def test_network_policy_lets_prometheus_reach_every_rank_behind_volcanos_policy():
    # Volcano's svc plugin admits only the job's own pods; this policy adds the Prometheus pods.
    base_port, ranks = 9400, 8
    spec = LaunchSpec(
        scheduler="kubernetes",
        queue="erw",
        namespace="ml",
        nodes=2,
        procs_per_node=ranks,
        gpus_per_node=ranks,
        image="registry.example.com/erw:test",
        metrics_port=base_port,
    )
    job = dry_run(spec, ["train", "--config", "configs/demo.yaml"])
    policy = resources()["NetworkPolicy/erw-allow-prometheus-scrape"]["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    (source,) = rule["from"]
    assert source["namespaceSelector"]["matchLabels"] and source["podSelector"]["matchLabels"]  # only Prometheus
    (ports,) = rule["ports"]
    for task in job["spec"]["tasks"]:
        labels = task["template"]["metadata"]["labels"]
        assert policy["podSelector"]["matchLabels"].items() <= labels.items()
        (container,) = task["template"]["spec"]["containers"]
        metrics = [p["containerPort"] for p in container["ports"] if p["name"].startswith("metrics-")]
        assert len(metrics) == ranks and all(ports["port"] <= port <= ports["endPort"] for port in metrics)
