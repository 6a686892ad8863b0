"""`erw promote`: publish a model only when it beats the published one, measured the same way.

The gate, in order:
1. The candidate's metrics.json (from `erw evaluate`) must hold a finite value of the metric.
2. Like with like: the candidate and the published model must have been evaluated against the
   same reference statistics, with the same number of samples, the same sampler (mode, solver,
   steps, CFG scale and interval, EMA or not, classes) and the same evaluator network. Otherwise
   the gate refuses (an error naming each difference), since their FIDs do not measure the
   same thing.
3. The candidate must be better by more than a margin (--margin, in metric units): FID moves
   between two evaluations of one model with different sampling seeds, and a smaller difference
   is noise. See DEFAULT_MARGIN.

The registry (erw/registry) is updated with a compare-and-swap, so concurrent runs never lose an
update, and a retried step that already published says so instead of "not promoted".
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
from typing import Any

from erw.config import PromoteConfig
from erw.errors import ErwError
from erw.evaluation.comparison import LOWER_IS_BETTER, comparison_problems
from erw.registry import Decision, Verdict, open_registry

# The smallest improvement that publishes, in metric units (promote.margin in the config). FID of
# one model moves between evaluations with different sampling seeds; the difference of two such
# evaluations has sqrt(2) times that spread, so a margin of 3 standard deviations of one FID keeps
# a noise-only "improvement" from publishing in about 98% of comparisons (one-sided normal). The
# default is that margin measured on the demo model (erw.config.PromoteConfig); the spread depends
# on the model, the evaluator and the sample count: measure yours with bench/fid_noise.py.
DEFAULT_MARGIN = PromoteConfig.margin


class PromoteError(ErwError):
    """The candidate or the registry cannot be used, or the two are not comparable; the message says why."""


def judge(candidate: dict[str, Any], metric: str, margin: float):
    value = candidate["metrics"][metric]

    def verdict(published: dict[str, Any] | None) -> Verdict:
        if published is None:
            return Verdict(True, f"{metric} {value:.4g}: the registry was empty")
        problems = comparison_problems(candidate["metrics"], published["metrics"])
        if problems:
            raise PromoteError(
                f"cannot compare {candidate['checkpoint']} with the published {published['checkpoint']}: their "
                "evaluations differ in\n  - "
                + "\n  - ".join(problems)
                + "\nEvaluate both with the same reference, sample count, sampler and evaluator network"
            )
        old = published["metrics"][metric]
        gain = (old - value) if LOWER_IS_BETTER[metric] else (value - old)
        relation = f"{metric} {value:.4g} vs the published {old:.4g} ({published['checkpoint']})"
        if gain > margin:
            return Verdict(True, f"{relation}: better by {gain:.4g} > margin {margin:g}")
        return Verdict(
            False,
            f"{relation}: {'better' if gain > 0 else 'not better'} by {max(gain, 0):.4g}, "
            f"not more than the margin {margin:g}",
        )

    return verdict


def promote_if_better(
    checkpoint: str,
    metrics_uri: str,
    registry_uri: str,
    run_id: str = "",
    metric: str = "fid",
    margin: float = DEFAULT_MARGIN,
) -> Decision:
    """Judge the candidate against the registry's published model; publish it when it passes."""
    if metric not in LOWER_IS_BETTER:
        raise PromoteError(f"--metric {metric!r} is not a gate metric: choose one of {', '.join(LOWER_IS_BETTER)}")
    if not math.isfinite(margin) or margin < 0:
        raise PromoteError(f"--margin {margin} must be a finite number >= 0 (in {metric} units)")
    metrics = _read_json(metrics_uri, "metrics file")
    value = metrics.get(metric)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise PromoteError(
            f"{metrics_uri} has no finite {metric!r} (has: {', '.join(sorted(metrics)) or 'nothing'}); "
            "evaluate the checkpoint first"
        )
    candidate = {
        "checkpoint": checkpoint,
        "run_id": run_id,
        "metric": metric,
        "metrics": metrics,
        "metrics_uri": metrics_uri,
        "lineage": lineage(checkpoint, metrics),
        "promoted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return open_registry(registry_uri).submit(candidate, judge(candidate, metric, margin))


def lineage(checkpoint: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """Where the candidate came from, from its checkpoint's meta.json: what retention keeps."""
    from erw import storage
    from erw.training.checkpoint import META

    found: dict[str, Any] = {"checkpoint": checkpoint, "samples": metrics.get("samples")}
    try:
        meta = _read_json(storage.join(checkpoint, META), "checkpoint meta")
    except (PromoteError, storage.StorageError) as err:  # the decision does not depend on it: record why
        return found | {"unknown": f"no lineage from {checkpoint}: {err}"}
    config = meta.get("config", {})
    return found | {
        "dataset": config.get("data", {}).get("shards"),
        "train_out": config.get("train", {}).get("out"),
        "warmup_out": config.get("warmup", {}).get("out"),
        "started_from": meta.get("init_from") or None,
        "step": meta.get("step"),
    }


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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "promote",
        help="publish a checkpoint in the model registry if it beats the published one",
        description="Publish CHECKPOINT in the registry only if its metric beats the published model's by more "
        "than --margin (FID: lower is better), after checking that both were evaluated the same way. "
        "A rejected candidate leaves the published model in place.",
    )
    p.add_argument("--checkpoint", required=True, help="the candidate checkpoint URI")
    p.add_argument("--metrics", required=True, help="its metrics.json (from erw evaluate)")
    p.add_argument(
        "--registry",
        required=True,
        help="registry JSON file, local or s3://, or mlflow:MODEL_NAME (MLflow at $MLFLOW_TRACKING_URI)",
    )
    p.add_argument("--metric", default="fid", choices=sorted(LOWER_IS_BETTER))
    p.add_argument(
        "--margin",
        type=float,
        default=DEFAULT_MARGIN,
        help=f"publish only when better by more than this, in metric units (default {DEFAULT_MARGIN}); "
        "measure FID's sampling noise at your sample count with bench/fid_noise.py",
    )
    p.add_argument("--run-id", default="", help="recorded with the entry")
    p.add_argument("--pushgateway", default="", help="host:port of a Prometheus Pushgateway for the decision")
    p.set_defaults(func=_run)


def push_decision(gateway: str, run_id: str, decision: Decision) -> None:
    """Push the gate's decision to a Pushgateway (host:port; '' = off): the dashboard's promote row.

    The `erw promote` command and the pipeline's promote step both push through here. The FIDs go
    with the decision when the gate judged by FID; the decision alone otherwise.
    """
    from erw.telemetry import push_metrics

    values = {"erw_promote_decision": 1.0 if decision.promoted else 0.0}
    if decision.candidate["metric"] == "fid":
        values["erw_promote_candidate_fid"] = decision.candidate["metrics"]["fid"]
        values["erw_promote_current_fid"] = decision.previous["metrics"]["fid"] if decision.previous else float("nan")
    push_metrics(gateway, "erw-promote", run_id, values)


def _run(args: argparse.Namespace) -> int:
    decision = promote_if_better(args.checkpoint, args.metrics, args.registry, args.run_id, args.metric, args.margin)
    print(decision.message)
    push_decision(args.pushgateway, args.run_id, decision)
    return 0
