"""A small Kubernetes API server for the launcher's tests: the endpoints `erw launch` and TorchX's
kubernetes scheduler call, over real HTTP, spoken to by the real `kubernetes` client.

It keeps Volcano jobs, pods, PodGroups and events in memory and records every request. A created
job walks through `phases` (one step per status read), so a test can say "Pending twice, then
Running, then Completed". It is not a Kubernetes: no admission, no controllers, no watch of
objects (the launcher polls); pod logs are served once, as `follow=true` streams end.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

JOBS = re.compile(r"^/apis/batch\.volcano\.sh/v1alpha1/namespaces/([^/]+)/jobs(?:/([^/]+))?(/status)?$")
PODGROUP = re.compile(r"^/apis/scheduling\.volcano\.sh/v1beta1/namespaces/([^/]+)/podgroups/([^/]+)$")
POD = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)(/log)?$")
EVENTS = re.compile(r"^/api/v1/namespaces/([^/]+)/events$")


@dataclass
class FakeKube:
    phases: list[str] = field(default_factory=lambda: ["Pending", "Running", "Running", "Completed"])
    jobs: dict[tuple[str, str], dict] = field(default_factory=dict)
    pods: dict[tuple[str, str], dict] = field(default_factory=dict)
    podgroups: dict[tuple[str, str], dict] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)
    logs: dict[str, list[str]] = field(default_factory=dict)  # pod name -> lines (with timestamps)
    default_log: list[str] = field(default_factory=list)  # for pods not in `logs`
    on_create: Any = None  # called with each created job (under the lock): add its PodGroup, events...
    on_status: Any = None  # called with the job after each status read (under the lock)
    refuse: Any = None  # (method, path) -> an HTTP error code to answer instead, or None
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    created: list[dict] = field(default_factory=list)  # bodies of POSTed jobs
    lock: threading.Lock = field(default_factory=threading.Lock)
    _scripts: dict[tuple[str, str], Any] = field(default_factory=dict)
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    # -- state a test sets up ---------------------------------------------------------------------

    def add_job(
        self, namespace: str, name: str, labels: dict[str, str], phase: str, phases: list[str] = (), age_s: float = 60
    ) -> dict:
        job = {
            "apiVersion": "batch.volcano.sh/v1alpha1",
            "kind": "Job",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": labels,
                "uid": str(uuid.uuid4()),
                "creationTimestamp": _timestamp(age_s),
            },
            "spec": {
                "tasks": [
                    {
                        "name": "trainer-0",
                        "replicas": 1,
                        "template": {"spec": {"containers": [{"name": "trainer-0", "image": "x"}]}},
                    }
                ]
            },
            "status": {"state": {"phase": phase}},
        }
        self.jobs[(namespace, name)] = job
        self._scripts[(namespace, name)] = iter(phases)
        self._add_pods(job)
        return job

    def add_pod(self, namespace: str, name: str, labels: dict[str, str] = (), owners: list[dict] = ()) -> None:
        self.pods[(namespace, name)] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(labels), "ownerReferences": list(owners)},
            "spec": {"containers": [{"name": "main", "image": "launcher"}]},
        }

    def set_phases(self, namespace: str, name: str, phases: list[str]) -> None:
        """The phases job `name` walks through from the next status read on."""
        self._scripts[(namespace, name)] = iter(phases)

    def add_event(
        self, namespace: str, kind: str, name: str, reason: str, message: str, type_: str = "Warning"
    ) -> None:
        self.events.append(
            {
                "metadata": {"name": f"{name}.{next(self._ids)}", "namespace": namespace},
                "involvedObject": {"kind": kind, "name": name, "namespace": namespace},
                "reason": reason,
                "message": message,
                "type": type_,
                "lastTimestamp": f"2026-01-01T00:01:{next(self._ids):02d}Z",
            }
        )

    def job_requests(self, name: str) -> list[tuple[str, str]]:
        return [(m, p) for m, p in self.requests if f"/jobs/{name}" in p]

    # -- the API ------------------------------------------------------------------------------------

    def handle(self, method: str, url: str, body: bytes) -> tuple[int, Any]:
        parsed = urlparse(url)
        path, query = parsed.path, {k: v[0] for k, v in parse_qs(parsed.query).items()}
        with self.lock:
            self.requests.append((method, path))
            if self.refuse and (code := self.refuse(method, path)):
                return code, _status(code, f"refused by the test: {method} {path}")
            if match := JOBS.match(path):
                return self._jobs(method, match[1], match[2], bool(match[3]), query, body)
            if (match := PODGROUP.match(path)) and method == "GET":
                return self._get(self.podgroups, match[1], match[2], "podgroups")
            if (match := POD.match(path)) and method == "GET":
                if match[3]:
                    return 200, "".join(line + "\n" for line in self.logs.get(match[2], self.default_log))
                return self._get(self.pods, match[1], match[2], "pods")
            if (match := EVENTS.match(path)) and method == "GET":
                wanted = dict(part.split("=", 1) for part in query.get("fieldSelector", "").split(",") if part)
                items = [
                    e
                    for e in self.events
                    if e["metadata"]["namespace"] == match[1] and all(e.get(k) == v for k, v in wanted.items())
                ]
                return 200, {"apiVersion": "v1", "kind": "EventList", "metadata": {}, "items": items}
        return 404, _status(404, f"the fake API has no {method} {path}")

    def _jobs(self, method: str, ns: str, name: str | None, status: bool, query: dict, body: bytes) -> tuple[int, Any]:
        if name is None and method == "POST":
            job = json.loads(body)
            self.created.append(json.loads(body))
            name = job["metadata"]["name"]
            job["metadata"].update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=_timestamp(0))
            job["status"] = {"state": {"phase": self.phases[0]}}
            self.jobs[(ns, name)] = job
            self._scripts[(ns, name)] = iter(self.phases[1:])
            self._add_pods(job)
            if self.on_create:
                self.on_create(job)
            return 201, job
        if name is None and method == "GET":
            wanted = dict(part.split("=", 1) for part in query.get("labelSelector", "").split(",") if part)
            items = [
                j
                for (n, _), j in self.jobs.items()
                if n == ns and wanted.items() <= j["metadata"].get("labels", {}).items()
            ]
            return 200, {"apiVersion": "batch.volcano.sh/v1alpha1", "kind": "JobList", "metadata": {}, "items": items}
        if (ns, name) not in self.jobs:
            return 404, _status(404, f'jobs.batch.volcano.sh "{name}" not found')
        if method == "DELETE":
            del self.jobs[(ns, name)]
            return 200, _status(200, "deleted")
        if method == "GET":
            job = self.jobs[(ns, name)]
            if status:  # every status read is one tick of the job's script
                phase = next(self._scripts[(ns, name)], None)
                if phase:
                    job["status"]["state"]["phase"] = phase
                if self.on_status:
                    self.on_status(job)
            return 200, job
        return 405, _status(405, method)

    def _get(self, store: dict, ns: str, name: str, kind: str) -> tuple[int, Any]:
        if (ns, name) in store:
            return 200, store[(ns, name)]
        return 404, _status(404, f'{kind} "{name}" not found')

    def _add_pods(self, job: dict) -> None:
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        for task in job["spec"]["tasks"]:
            pod_name = f"{name}-{task['name']}-0"
            self.pods[(ns, pod_name)] = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": pod_name, "namespace": ns},
                "spec": task["template"]["spec"],
            }


def _timestamp(age_s: float) -> str:
    """RFC 3339, as the API server writes creationTimestamp: now minus age_s."""
    return (datetime.now(timezone.utc) - timedelta(seconds=age_s)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, message: str) -> dict:
    reason = {403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed", 503: "ServiceUnavailable"}.get(code, "")
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure" if code >= 400 else "Success",
        "message": message,
        "reason": reason,
        "code": code,
    }


class Server:
    """`with Server(fake) as kubeconfig:` serves `fake` on 127.0.0.1 and writes a kubeconfig for it."""

    def __init__(self, fake: FakeKube, directory: Path) -> None:
        self.fake, self.directory = fake, directory

    def __enter__(self) -> Path:
        fake = self.fake

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                code, payload = fake.handle(self.command, self.path, self.rfile.read(length) if length else b"")
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _serve

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        path = self.directory / "kubeconfig"
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "fake",
                    "clusters": [{"name": "fake", "cluster": {"server": url}}],
                    "users": [{"name": "fake", "user": {"token": "test"}}],
                    "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
                }
            )
        )
        return path

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
