"""Model registries the promote gate publishes to.

    registry.json (local or s3://)   the default: one small JSON file, no dependency, updated
                                     with a compare-and-swap (json_file.py)
    mlflow:MODEL_NAME                MLflow Model Registry at $MLFLOW_TRACKING_URI: a model
                                     version per candidate, the `champion` alias moved only
                                     when the gate passes (mlflow_models.py)

Both hold entries of the same shape:

    {"checkpoint": URI, "run_id": ..., "metrics": the candidate's metrics.json,
     "metrics_uri": ..., "lineage": {"dataset", "train_out", "started_from", ...},
     "promoted_at": ISO-8601}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from erw.errors import ErwError

MLFLOW_SCHEME = "mlflow:"


class RegistryError(ErwError):
    """The registry cannot be read or updated; the message says which and why."""


@dataclass
class Verdict:
    promote: bool
    reason: str  # one line: why, with both values


@dataclass
class Decision:
    promoted: bool
    reason: str
    candidate: dict[str, Any]
    previous: dict[str, Any] | None  # the published entry the candidate was judged against
    registry_uri: str
    already: bool = False  # a retried step: the registry already held this candidate

    @property
    def message(self) -> str:
        verdict = "promoted" if self.promoted else "not promoted"
        retry = " (a retried step: the registry already held it)" if self.already else ""
        return f"{verdict}{retry} {self.candidate['checkpoint']}: {self.reason}"

    def markdown(self) -> str:
        from erw.evaluation.comparison import LOWER_IS_BETTER

        rows = [("candidate", self.candidate)] + ([("published before", self.previous)] if self.previous else [])
        names = [k for k in LOWER_IS_BETTER if any(k in e["metrics"] for _, e in rows)]
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


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


class Registry(Protocol):
    uri: str

    def submit(self, candidate: dict[str, Any], judge: Callable[[dict[str, Any] | None], Verdict]) -> Decision:
        """Publish candidate if judge(current published entry or None) says so; safe when other
        runs submit at the same time, and idempotent when a step is retried."""

    def published(self) -> dict[str, Any] | None:
        """The currently published entry."""

    def entries(self) -> list[dict[str, Any]]:
        """Every entry that was ever published, oldest first."""


def open_registry(uri: str) -> Registry:
    if uri.startswith(MLFLOW_SCHEME):
        from erw.registry.mlflow_models import MlflowRegistry

        return MlflowRegistry(uri[len(MLFLOW_SCHEME) :])
    from erw.registry.json_file import JsonRegistry

    return JsonRegistry(uri)
