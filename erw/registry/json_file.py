"""The default registry: one JSON file, local or on S3, that serving and people read.

    {"format_version": 2, "metric": "fid",
     "current": the published entry, "history": [every entry ever published, oldest first]}

Updates are a compare-and-swap: read the file and its version (S3 ETag), decide, write only if
the file still holds that version (PutObject with If-Match, or If-None-Match: * when it does not
exist yet; locally the same under a file lock). When another run wrote in between, the write is
refused and the decision is made again against what that run published, so no update is lost.
A retried step finds its own entry in the history and reports it as promoted.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any, Callable

from erw import storage
from erw.registry import Decision, RegistryError, Verdict

FORMAT_VERSION = 2
CAS_ATTEMPTS = 20  # each failed attempt means another run published in between


class JsonRegistry:
    def __init__(self, uri: str):
        self.uri = uri

    def _read(self) -> tuple[dict[str, Any] | None, str | None]:
        try:
            data, version = storage.read_versioned(self.uri)
        except storage.ObjectNotFound:
            return None, None
        try:
            state = json.loads(data)
        except ValueError as err:
            raise RegistryError(f"registry {self.uri} is not valid JSON: {err}") from None
        if not isinstance(state, dict) or not isinstance(state.get("history", []), list):
            raise RegistryError(f"registry {self.uri} must hold a JSON object with a history list")
        return state, version

    def published(self) -> dict[str, Any] | None:
        state, _ = self._read()
        return state.get("current") if state else None

    def entries(self) -> list[dict[str, Any]]:
        state, _ = self._read()
        return list(state.get("history", [])) if state else []

    def submit(self, candidate: dict[str, Any], judge: Callable[[dict[str, Any] | None], Verdict]) -> Decision:
        metric = candidate["metric"]
        for attempt in range(CAS_ATTEMPTS):
            state, version = self._read()
            if state is not None and state.get("metric", metric) != metric:
                raise RegistryError(
                    f"registry {self.uri} ranks models by {state['metric']!r}, not {metric!r}: "
                    f"pass --metric {state['metric']} or use another registry"
                )
            current = state.get("current") if state else None
            earlier = _find(state, candidate["checkpoint"])
            if earlier is not None:  # this step ran before and published: say so, change nothing
                now = (
                    ""
                    if current and current["checkpoint"] == earlier["checkpoint"]
                    else (f"; since replaced by {current['checkpoint']}" if current else "")
                )
                return Decision(
                    True,
                    f"already published at {earlier.get('promoted_at')}{now}",
                    earlier,
                    current,
                    self.uri,
                    already=True,
                )
            verdict = judge(current)
            if not verdict.promote:
                return Decision(False, verdict.reason, candidate, current, self.uri)
            history = (state or {}).get("history", [])
            updated = {
                "format_version": FORMAT_VERSION,
                "metric": metric,
                "current": candidate,
                "history": [*history, candidate],
            }
            if storage.write_if(self.uri, json.dumps(updated, indent=2).encode(), version):
                return Decision(True, verdict.reason, candidate, current, self.uri)
            time.sleep(random.uniform(0, 0.05 * (attempt + 1)))  # another run published: judge again
        raise RegistryError(f"registry {self.uri} changed under each of {CAS_ATTEMPTS} attempts to update it; retry")


def _find(state: dict[str, Any] | None, checkpoint: str) -> dict[str, Any] | None:
    for entry in reversed((state or {}).get("history", [])):
        if entry.get("checkpoint") == checkpoint:
            return entry
    return None
