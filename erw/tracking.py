"""Training runs logged to MLflow, so their loss curves compare in one place with the models
the promote gate registers there. On when MLFLOW_TRACKING_URI is set (and `erw[mlflow]` is
installed); rank 0 logs. One MLflow run per erw run and phase, in the experiment
MLFLOW_EXPERIMENT_NAME (default "erw"), named RUN_ID/PHASE: a resumed run (same run id)
continues the same MLflow run instead of starting a second one.
"""

from __future__ import annotations

import os
from typing import Any

from erw.errors import ErwError

DEFAULT_EXPERIMENT = "erw"


class MlflowRunLogger:
    """Params once (the flattened config), metrics at every log step, the status at the end."""

    def __init__(self, cfg: Any, phase: str):
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise ErwError(
                "MLFLOW_TRACKING_URI is set but MLflow is not installed: pip install 'erw[mlflow]'"
            ) from None
        self.client = MlflowClient()
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run_name = f"{cfg.run_id}/{phase}"
        found = self.client.search_runs([experiment_id], f"tags.`erw.run` = '{run_name}'", max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(
                experiment_id, run_name=run_name, tags={"erw.run": run_name, "erw.phase": phase}
            )
            self.run_id = run.info.run_id
            params = _flatten(cfg.to_dict())
            for key, value in params.items():
                self.client.log_param(self.run_id, key, str(value)[:500])

    def log(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.client.log_metric(self.run_id, key, float(value), step=step)

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


def run_logger(cfg: Any, phase: str, is_main: bool) -> MlflowRunLogger | None:
    """The MLflow logger of this process, or None (not configured, or not rank 0)."""
    if not is_main or not os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    return MlflowRunLogger(cfg, phase)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out
