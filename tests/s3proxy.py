"""A fault-injecting HTTP proxy in front of a real S3 endpoint (the moto server in the tests).

boto3 talks to the proxy (AWS_ENDPOINT_URL); the proxy forwards each request unchanged to the
upstream endpoint and injects, on demand, the faults a real endpoint shows:

    proxy.fail(n, status=503, code="SlowDown")  the next n requests get an S3 error response
    proxy.reset(n)                             the next n requests: connection reset, no response
    proxy.stall(n, after=1000)                 the next n GETs send headers and `after` body bytes,
                                               then nothing (the connection stays open)
    proxy.cut(n, after=1000)                   the next n GETs send headers and `after` body bytes,
                                               then reset the connection
    proxy.outage(seconds)                      every request for that long: connection reset
                                               (a restarting endpoint or a load-balancer failover)

`method="GET"` (or "PUT", "POST", ...) restricts fail/reset/stall to requests with that method.
`proxy.injected` counts what was injected; `proxy.log` lists (method, path, Range header) of
every request. Used by tests/test_storage.py, tests/chaos/ and
bench/chaos.py; it can also run alone: `python tests/s3proxy.py UPSTREAM_URL` prints its URL.
"""

from __future__ import annotations

import http.client
import socket
import socketserver
import struct
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlsplit

_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "expect", "transfer-encoding", "te", "upgrade"}


@dataclass
class _Rule:
    kind: str  # fail | reset | stall | cut
    remaining: int
    method: str | None
    status: int = 503
    code: str = "SlowDown"
    after: int = 0

    def matches(self, method: str) -> bool:
        return self.remaining > 0 and (self.method is None or self.method == method)


class FaultProxy:
    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port or 80)
        self.rules: list[_Rule] = []
        self.outage_until = 0.0
        self.injected: Counter[str] = Counter()
        self.log: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FaultProxy":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- fault controls ----------------------------------------------------------------------
    def fail(self, n: int, status: int = 503, code: str = "SlowDown", method: str | None = None) -> None:
        self._add(_Rule("fail", n, method, status=status, code=code))

    def reset(self, n: int, method: str | None = None) -> None:
        self._add(_Rule("reset", n, method))

    def stall(self, n: int, after: int = 0, method: str | None = "GET") -> None:
        self._add(_Rule("stall", n, method, after=after))

    def cut(self, n: int, after: int = 0, method: str | None = "GET") -> None:
        self._add(_Rule("cut", n, method, after=after))

    def outage(self, seconds: float) -> None:
        with self.lock:
            self.outage_until = time.monotonic() + seconds

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()
            self.outage_until = 0.0

    def _add(self, rule: _Rule) -> None:
        with self.lock:
            self.rules.append(rule)

    def _take(self, method: str, path: str, range_: str | None) -> _Rule | None:
        with self.lock:
            self.log.append((method, path, range_))
            if time.monotonic() < self.outage_until:
                self.injected["outage"] += 1
                return _Rule("reset", 1, None)
            for rule in self.rules:
                if rule.matches(method):
                    rule.remaining -= 1
                    self.injected[rule.kind] += 1
                    return rule
        return None


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, and "100 Continue" for botocore's uploads

    def log_message(self, *args) -> None:  # quiet
        pass

    def _forward(self) -> None:
        body = self._read_body()
        rule = self.owner._take(self.command, self.path, self.headers.get("Range"))
        if rule is not None and rule.kind == "reset":
            self._reset()
            return
        if rule is not None and rule.kind == "fail":
            payload = (
                f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{rule.code}</Code>'
                f"<Message>injected by the fault proxy</Message></Error>"
            ).encode()
            self.send_response(rule.status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        conn = http.client.HTTPConnection(*self.owner.upstream, timeout=120)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
            if body is not None:
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in _HOP_HEADERS and key.lower() != "content-length":
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if rule is not None and rule.kind in ("stall", "cut") and self.command == "GET":
            self.wfile.write(data[: rule.after])
            self.wfile.flush()
            if rule.kind == "stall":
                self.owner.stopping.wait(600)  # hold the connection open, send nothing more
                self._reset()
            else:  # FIN after the bytes sent (an RST could discard them): the body ends early
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_WR)
            return
        if self.command != "HEAD":
            self.wfile.write(data)

    def _read_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length", 0) or 0)
        return self.rfile.read(length) if length else (b"" if self.command in ("PUT", "POST") else None)

    def _reset(self) -> None:
        # SO_LINGER 0: close() sends RST, the client sees "connection reset by peer"
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


if __name__ == "__main__":
    with FaultProxy(sys.argv[1]) as running:
        print(running.url, flush=True)
        running.stopping.wait()
