"""MLflow Model Registry as the gate's registry (`--registry mlflow:MODEL_NAME`).

Needs `pip install erw[mlflow]` and MLFLOW_TRACKING_URI (the server, e.g. http://mlflow:5000).
Every candidate becomes a model version of MODEL_NAME, whatever the verdict:

    source       the checkpoint URI
    run          an MLflow run in the experiment "erw-promote" holding the candidate's metrics
                 (so versions compare in the MLflow UI) and its evaluation settings as params
    tags         erw.checkpoint, erw.run_id, erw.verdict, erw.lineage.* (dataset, train_out,
                 started_from, ...), erw.entry (the whole entry as JSON, what the gate reads back)

The alias `champion` is what serving loads; it moves to the new version only when the gate
passes, and versions it pointed to are tagged erw.published=true (the history).

Concurrency: MLflow has no conditional alias update, so unlike the JSON registry this is not a
compare-and-swap. After moving the alias the gate reads it back and, if another run moved it in
between, judges again against that run's version and moves it back when ours is better; two
runs finishing within the same second can still both report "promoted" while the alias ends
on the better one. Run promotes one at a time (the pipeline's recurring run has
max_concurrency=1) or use the JSON registry when runs overlap. A retried step finds its version
by the erw.checkpoint tag and reports the verdict recorded there.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from erw.registry import Decision, RegistryError, Verdict

ALIAS = "champion"
EXPERIMENT = "erw-promote"
TAG_VALUE_LIMIT = 5000  # MLflow's limit on a tag value


class MlflowRegistry:
    def __init__(self, model_name: str):
        if not model_name:
            raise RegistryError("--registry mlflow:MODEL_NAME needs a model name, e.g. mlflow:sit-xl-imagenet256")
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            raise RegistryError(f"--registry mlflow:{model_name} needs MLFLOW_TRACKING_URI (the MLflow server's URL)")
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise RegistryError("--registry mlflow:... needs MLflow: pip install 'erw[mlflow]'") from None
        self.name = model_name
        self.uri = f"mlflow:{model_name}"
        self.client = MlflowClient()

    # -- reading -------------------------------------------------------------------------------

    def _versions(self) -> list[Any]:
        from mlflow.exceptions import MlflowException

        try:
            versions = self.client.search_model_versions(f"name = '{self.name}'")
        except MlflowException as err:
            if "RESOURCE_DOES_NOT_EXIST" in str(err.error_code):
                return []
            raise
        return sorted(versions, key=lambda v: int(v.version))

    def _champion(self) -> Any | None:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(self.name, ALIAS)
        except MlflowException:
            return None  # no registered model yet, or no alias set

    def published(self) -> dict[str, Any] | None:
        champion = self._champion()
        return _entry(champion) if champion else None

    def entries(self) -> list[dict[str, Any]]:
        return [_entry(v) for v in self._versions() if v.tags.get("erw.published") == "true"]

    # -- the gate --------------------------------------------------------------------------------

    def submit(self, candidate: dict[str, Any], judge: Callable[[dict[str, Any] | None], Verdict]) -> Decision:
        mine = next(
            (v for v in reversed(self._versions()) if v.tags.get("erw.checkpoint") == candidate["checkpoint"]), None
        )
        champion = self._champion()
        if mine is not None and mine.tags.get("erw.published") == "true":
            now = (
                ""
                if champion and champion.version == mine.version
                else (f"; since replaced by {_entry(champion)['checkpoint']}" if champion else "")
            )
            return Decision(
                True,
                f"already published as version {mine.version}{now}",
                _entry(mine),
                _entry(champion) if champion else None,
                self.uri,
                already=True,
            )
        if mine is None:
            mine = self._register(candidate)
        for _ in range(5):
            current = _entry(champion) if champion else None
            verdict = judge(current)
            self.client.set_model_version_tag(self.name, mine.version, "erw.verdict", verdict.reason[:TAG_VALUE_LIMIT])
            if not verdict.promote:
                return Decision(False, verdict.reason, candidate, current, self.uri)
            self.client.set_model_version_tag(self.name, mine.version, "erw.published", "true")
            self.client.set_registered_model_alias(self.name, ALIAS, mine.version)
            now = self._champion()
            if now is not None and now.version == mine.version:
                return Decision(
                    True, f"{verdict.reason}; alias {ALIAS} -> version {mine.version}", candidate, current, self.uri
                )
            champion = now  # another run moved the alias between our read and our write: judge again
        raise RegistryError(f"the {ALIAS} alias of {self.name} kept moving under 5 attempts to set it; retry")

    def _register(self, candidate: dict[str, Any]) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(self.name, description="Published by `erw promote`.")
        except MlflowException as err:
            if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
                raise
        run_id = self._log_evaluation(candidate)
        entry = json.dumps(candidate)
        if len(entry) > TAG_VALUE_LIMIT:  # notes and the like are not needed to judge
            slim = dict(candidate, metrics={k: v for k, v in candidate["metrics"].items() if k != "notes"})
            entry = json.dumps(slim)
        tags = {
            "erw.checkpoint": candidate["checkpoint"],
            "erw.run_id": candidate.get("run_id", ""),
            "erw.entry": entry,
            **{f"erw.lineage.{k}": str(v) for k, v in candidate.get("lineage", {}).items() if v is not None},
        }
        return self.client.create_model_version(
            self.name,
            source=candidate["checkpoint"],
            run_id=run_id,
            tags=tags,
            description=f"erw run {candidate.get('run_id', '')}",
        )

    def _log_evaluation(self, candidate: dict[str, Any]) -> str:
        from erw.evaluation.comparison import evaluation_settings

        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(EXPERIMENT)
        run = self.client.create_run(
            experiment_id,
            run_name=f"promote {candidate.get('run_id') or candidate['checkpoint']}",
            tags={"erw.checkpoint": candidate["checkpoint"]},
        )
        for key, value in candidate["metrics"].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.client.log_metric(run.info.run_id, key, float(value))
        for key, value in evaluation_settings(candidate["metrics"]).items():
            self.client.log_param(run.info.run_id, key.replace(" ", "_"), str(value)[:500])
        self.client.set_terminated(run.info.run_id)
        return run.info.run_id


def _entry(version: Any) -> dict[str, Any]:
    try:
        return json.loads(version.tags["erw.entry"])
    except (KeyError, ValueError):
        raise RegistryError(
            f"model version {version.version} of {version.name} was not registered by `erw promote` (no erw.entry "
            "tag): the gate cannot compare with it. Move the champion alias to an erw version, or use a new model name"
        ) from None
