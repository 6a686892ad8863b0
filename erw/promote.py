"""`erw promote`: publish a model only when it beats the published one.

The registry is one small JSON file (local or S3) that serving and people read:

    {"format_version": 1,
     "metric": "fid",
     "current": {"checkpoint": URI, "metrics": {...}, "run_id": ..., "promoted_at": ISO-8601},
     "history": [every entry that was ever current, oldest first]}

A candidate replaces `current` only when it is strictly better on the registry's metric, so a
scheduled retraining that comes out worse never replaces a better model. A rejected candidate
leaves the file untouched.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
from dataclasses import dataclass
from typing import Any

from erw.errors import ErwError

FORMAT_VERSION = 1
# Metrics a gate may use, and whether lower is better.
LOWER_IS_BETTER = {"fid": True, "sfid": True, "inception_score": False, "precision": False, "recall": False}


class PromoteError(ErwError):
    """The candidate or the registry cannot be read; the message says which and why."""


@dataclass
class Decision:
    promoted: bool
    metric: str
    candidate: dict[str, Any]
    previous: dict[str, Any] | None  # the published entry before this decision
    registry_uri: str

    @property
    def message(self) -> str:
        value = self.candidate["metrics"][self.metric]
        if self.previous is None:
            return f"promoted {self.candidate['checkpoint']} ({self.metric} {value:.4g}): the registry was empty"
        old = self.previous["metrics"][self.metric]
        verdict = "promoted" if self.promoted else "not promoted"
        relation = "better than" if self.promoted else "not better than"
        return (
            f"{verdict} {self.candidate['checkpoint']}: {self.metric} {value:.4g} is {relation} "
            f"the published {old:.4g} ({self.previous['checkpoint']})"
        )

    def markdown(self) -> str:
        rows = [("candidate", self.candidate)] + ([("published before", self.previous)] if self.previous else [])
        names = sorted(self.candidate["metrics"])
        lines = [
            f"## {'Promoted' if self.promoted else 'Not promoted'}",
            "",
            self.message,
            "",
            "| model | checkpoint | " + " | ".join(names) + " |",
            "|---|---|" + "---|" * len(names),
        ]
        for label, entry in rows:
            values = [_fmt(entry["metrics"].get(n)) for n in names]
            lines.append(f"| {label} | `{entry['checkpoint']}` | " + " | ".join(values) + " |")
        lines += ["", f"Registry: `{self.registry_uri}`"]
        return "\n".join(lines) + "\n"


def promote_if_better(
    checkpoint: str, metrics_uri: str, registry_uri: str, run_id: str = "", metric: str = "fid"
) -> Decision:
    """Compare the candidate with the registry's current model; publish it when strictly better."""
    from erw import storage

    if metric not in LOWER_IS_BETTER:
        raise PromoteError(f"--metric {metric!r} is not a gate metric: choose one of {', '.join(LOWER_IS_BETTER)}")
    metrics = _read_json(metrics_uri, "metrics file")
    value = metrics.get(metric)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise PromoteError(
            f"{metrics_uri} has no finite {metric!r} (has: {', '.join(sorted(metrics)) or 'nothing'}); "
            "evaluate the checkpoint first"
        )
    registry = _read_json(registry_uri, "registry") if storage.exists(registry_uri) else None
    if registry is not None and registry.get("metric", metric) != metric:
        raise PromoteError(
            f"registry {registry_uri} ranks models by {registry['metric']!r}, not {metric!r}: "
            f"pass --metric {registry['metric']} or use another registry"
        )
    previous = registry.get("current") if registry else None
    if previous is not None and not isinstance(previous.get("metrics", {}).get(metric), (int, float)):
        raise PromoteError(f"registry {registry_uri}: the current entry has no {metric!r}; fix or remove the file")
    candidate = {
        "checkpoint": checkpoint,
        "metrics": metrics,
        "run_id": run_id,
        "promoted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    promoted = previous is None or _better(value, previous["metrics"][metric], metric)
    if promoted:
        history = (registry or {}).get("history", [])
        updated = {"format_version": FORMAT_VERSION, "metric": metric, "current": candidate, "history": [*history, candidate]}
        storage.write_bytes(registry_uri, json.dumps(updated, indent=2).encode())
    return Decision(promoted, metric, candidate, previous, registry_uri)


def _better(value: float, published: float, metric: str) -> bool:
    return value < published if LOWER_IS_BETTER[metric] else value > published


def _read_json(uri: str, what: str) -> dict[str, Any]:
    from erw import storage

    try:
        data = json.loads(storage.read_bytes(uri))
    except (FileNotFoundError, storage.ObjectNotFound):
        raise PromoteError(f"{what} {uri} does not exist") from None
    except ValueError as err:
        raise PromoteError(f"{what} {uri} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise PromoteError(f"{what} {uri} must hold a JSON object")
    return data


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "promote",
        help="publish a checkpoint in the model registry if it beats the published one",
        description="Publish CHECKPOINT in the registry file only if its metric is strictly better than "
        "the published model's (FID: lower is better). A worse candidate leaves the registry untouched.",
    )
    p.add_argument("--checkpoint", required=True, help="the candidate checkpoint URI")
    p.add_argument("--metrics", required=True, help="its metrics.json (from erw evaluate)")
    p.add_argument("--registry", required=True, help="registry JSON file, local or s3://")
    p.add_argument("--metric", default="fid", choices=sorted(LOWER_IS_BETTER))
    p.add_argument("--run-id", default="", help="recorded with the entry")
    p.add_argument("--pushgateway", default="", help="host:port of a Prometheus Pushgateway for the decision")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from erw.telemetry import push_metrics

    decision = promote_if_better(args.checkpoint, args.metrics, args.registry, args.run_id, args.metric)
    print(decision.message)
    if decision.metric == "fid":
        current = decision.previous["metrics"]["fid"] if decision.previous else float("nan")
        push_metrics(args.pushgateway, "erw-promote", args.run_id, {
            "erw_promote_decision": 1.0 if decision.promoted else 0.0,
            "erw_promote_candidate_fid": decision.candidate["metrics"]["fid"],
            "erw_promote_current_fid": current,
        })
    return 0
