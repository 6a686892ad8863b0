"""A real Prometheus and Pushgateway for tests, on free 127.0.0.1 ports with a temporary config.

Prometheus scrapes every second. It finds training targets through a file_sd directory, so a
test adds targets at run time (`stack.scrape(...)`) without restarting it; the Pushgateway is
scraped with honor_labels, as in the cluster. Missing binaries fail the tests with the install
command, unless ERW_ALLOW_MISSING_PROMETHEUS=1, which skips them instead.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
import yaml

INSTALL_HINT = (
    "install them with `apt-get update && apt-get install -y prometheus prometheus-pushgateway` "
    "(or set ERW_ALLOW_MISSING_PROMETHEUS=1 to skip these tests)"
)
SCRAPE_INTERVAL = "1s"


def require_binary(name: str) -> str:
    """Path of a Prometheus tool; fail (or skip, when allowed) if it is not installed."""
    path = shutil.which(name)
    if path is None:
        message = f"`{name}` is not on PATH: {INSTALL_HINT}"
        if os.environ.get("ERW_ALLOW_MISSING_PROMETHEUS") == "1":
            pytest.skip(message)
        pytest.fail(message, pytrace=False)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_range(count: int) -> int:
    """A base port such that base .. base + count - 1 are all free right now."""
    for _ in range(100):
        base = free_port()
        if base + count > 65535:
            continue
        try:
            socks = []
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports found")


def _http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def _start(cmd: list[str], ready_url: str, log_path: Path, timeout: float = 30.0) -> subprocess.Popen:
    log = log_path.open("wb")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            _http_get(ready_url, timeout=1.0)
            return process
        except OSError:
            time.sleep(0.1)
    _stop(process)
    tail = log_path.read_text(errors="replace")[-3000:]
    raise RuntimeError(f"{cmd[0]} did not become ready at {ready_url}; its log ends with:\n{tail}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class PrometheusStack:
    prometheus_url: str
    pushgateway: str  # host:port, as erw's metrics.pushgateway takes it
    sd_dir: Path

    def scrape(self, name: str, targets: list[str]) -> None:
        """Have Prometheus scrape `targets` (host:port) from now on, under job=name."""
        tmp = self.sd_dir / f".{name}.json"
        tmp.write_text(json.dumps([{"targets": targets, "labels": {"job": name}}]))
        tmp.replace(self.sd_dir / f"{name}.json")  # atomic: Prometheus never reads half a file

    def query(self, promql: str) -> list[dict]:
        """Instant query through the HTTP API; returns the result vector."""
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        body = json.loads(_http_get(url))
        if body.get("status") != "success":
            raise AssertionError(f"query {promql!r} failed: {body}")
        return body["data"]["result"]

    def wait_for(self, promql: str, accept: Callable[[list[dict]], bool] = bool, timeout: float = 30.0) -> list[dict]:
        """Poll `promql` until accept(result) holds; fail with the last result after timeout."""
        deadline = time.monotonic() + timeout
        result: list[dict] = []
        while time.monotonic() < deadline:
            result = self.query(promql)
            if accept(result):
                return result
            time.sleep(0.5)
        targets = json.loads(_http_get(f"{self.prometheus_url}/api/v1/targets"))["data"]["activeTargets"]
        health = [(t["scrapeUrl"], t["health"], t.get("lastError")) for t in targets]
        raise AssertionError(f"{promql!r} never matched within {timeout}s; last result {result}; targets {health}")


def start_stack(workdir: Path) -> Iterator[PrometheusStack]:
    """Start Pushgateway then Prometheus in workdir; yield the stack; stop both."""
    prometheus = require_binary("prometheus")
    pushgateway = require_binary("prometheus-pushgateway")
    sd_dir = workdir / "targets"
    sd_dir.mkdir(parents=True)
    gateway = f"127.0.0.1:{free_port()}"
    config = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": [
            {
                "job_name": "pushgateway",
                "honor_labels": True,  # keep the pushed job/run_id labels instead of the gateway's
                "static_configs": [{"targets": [gateway]}],
            },
            {
                "job_name": "training",
                "file_sd_configs": [{"files": [str(sd_dir / "*.json")], "refresh_interval": SCRAPE_INTERVAL}],
            },
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom_address = f"127.0.0.1:{free_port()}"
    processes = []
    try:
        processes.append(
            _start(
                # In memory only: Debian's build persists to /var/lib/prometheus/pushgateway.data by default,
                # which would hand every later test session (and every checkout on the machine) earlier pushes.
                [pushgateway, f"--web.listen-address={gateway}", "--persistence.file="],
                f"http://{gateway}/-/ready",
                workdir / "pushgateway.log",
            )
        )
        processes.append(
            _start(
                [
                    prometheus,
                    f"--config.file={workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address={prom_address}",
                    "--log.level=warn",
                ],
                f"http://{prom_address}/-/ready",
                workdir / "prometheus.log",
            )
        )
        yield PrometheusStack(prometheus_url=f"http://{prom_address}", pushgateway=gateway, sd_dir=sd_dir)
    finally:
        for process in reversed(processes):
            _stop(process)
