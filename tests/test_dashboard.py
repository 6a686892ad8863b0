"""The Grafana dashboard: valid JSON, valid PromQL, and every query names a metric erw exports
(or one of the DCGM exporter's). The alert rules are held to the same names."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from erw.telemetry import PUSHED_METRICS, TrainingMetrics
from tests.prometheus import free_port, require_binary

MONITORING = Path(__file__).parents[1] / "k8s" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$run_id": ".*", "$phase": ".*"}
PROMQL_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(board: dict) -> list[str]:
    """Every PromQL expression: panel targets and the template variables' label_values()."""
    found = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["query"]["query"])
            assert match, f"template variable {variable['name']} is not a label_values() query"
            found.append(match.group(1))
    return found


def substitute_variables(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (a small lexer, enough for dashboard queries)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges and subqueries
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        following = expr[match.end() :].lstrip()
        if following.startswith("(") or match.group() in PROMQL_KEYWORDS:
            continue  # a function or aggregation, or an operator keyword
        if match.start() and expr[match.start() - 1].isdigit():
            continue  # the exponent or unit of a number
        names.add(match.group())
    return names


def exported_names() -> set[str]:
    """Series names a live TrainingMetrics serves after every kind of update, plus pushed ones."""
    port = free_port()
    metrics = TrainingMetrics(port, "names", "train", rank=0, local_rank=0, checkpoint_every=10, addr="127.0.0.1")
    try:
        metrics.observe_step(
            step=1,
            samples=4,
            losses={"loss": 1.0},
            align_weight=1.0,
            lr=1e-4,
            grad_norm=1.0,
            step_seconds=0.1,
            data_wait_seconds=0.01,
        )
        metrics.observe_checkpoint(1.0, ok=True)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        metrics.close()
    names = {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}
    return names | set(PUSHED_METRICS)


def test_metric_name_lexer():
    expr = 'sum by (le, run_id) (rate(erw_step_seconds_bucket{phase=~"a|b"}[5m])) / on (pod) group_left (x) up'
    assert metric_names(expr) == {"erw_step_seconds_bucket", "up"}
    assert metric_names("time() - max(erw_x) > 2 * 1e3 and erw_y offset 5m") == {"erw_x", "erw_y"}


def test_dashboard_parses_and_is_well_formed():
    board = dashboard()
    assert board["uid"] and board["title"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == "${datasource}", f"panel {panel['title']!r} hard-codes a datasource"


def test_every_query_names_an_exported_metric():
    exported = exported_names()
    unknown = {}
    for expr in queries(dashboard()):
        for name in metric_names(substitute_variables(expr)):
            if name not in exported and not name.startswith("DCGM_FI_"):
                unknown.setdefault(name, expr)
    assert not unknown, f"dashboard queries name metrics erw does not export: {unknown}"


def test_every_alert_names_an_exported_metric():
    rules = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())["spec"]["groups"]
    exprs = [rule["expr"] for group in rules for rule in group["rules"]]
    unknown = set().union(*(metric_names(e) for e in exprs)) - exported_names()
    assert not unknown, f"alert rules name metrics erw does not export: {unknown}"


def test_dashboard_covers_the_issue():
    used = set().union(*(metric_names(substitute_variables(e)) for e in queries(dashboard())))
    wanted = {
        "erw_loss",
        "erw_align_weight",
        "erw_samples_total",
        "erw_data_wait_seconds_sum",
        "erw_step_seconds_bucket",
        "erw_accelerator_memory_max_allocated_bytes",
        "DCGM_FI_DEV_GPU_UTIL",
        "erw_checkpoint_last_success_timestamp_seconds",
        "erw_eval_fid",
    }
    assert wanted <= used, f"dashboard lacks {wanted - used}"


def test_every_query_is_valid_promql(tmp_path):
    """promtool parses each query as a recording rule (Grafana variables filled in)."""
    promtool = require_binary("promtool")
    rules = [
        {"record": f"dashboard:query_{i}", "expr": substitute_variables(expr)}
        for i, expr in enumerate(queries(dashboard()))
    ]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
