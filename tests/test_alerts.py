"""The PrometheusRule in k8s/monitoring: valid for promtool, and every alert fires on a bad
synthetic run and stays silent on a healthy one (`promtool test rules`)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.prometheus import require_binary

RULE_FILE = Path(__file__).parents[1] / "k8s" / "monitoring" / "prometheusrule.yaml"
MINUTES = 90  # length of every synthetic series, one sample a minute
BASE = {"namespace": "ml", "phase": "train", "rank": "0"}


def series(name: str, values: list[float | None], **labels: str) -> dict:
    """One input series; None is a missing sample (the pod was not there)."""
    text = " ".join("_" if v is None else repr(float(v)) for v in values)
    matchers = ", ".join(f'{k}="{v}"' for k, v in {**BASE, **labels}.items())
    return {"series": f"{name}{{{matchers}}}", "values": text}


def per_minute(f) -> list[float | None]:
    return [f(minute) for minute in range(MINUTES + 1)]


def rules() -> list[dict]:
    resource = yaml.safe_load(RULE_FILE.read_text())
    assert resource["kind"] == "PrometheusRule"
    return [rule for group in resource["spec"]["groups"] for rule in group["rules"]]


def write_rules_file(tmp_path: Path) -> Path:
    """The PrometheusRule's spec is exactly a Prometheus rules file."""
    resource = yaml.safe_load(RULE_FILE.read_text())
    path = tmp_path / "erw.rules.yml"
    path.write_text(yaml.safe_dump({"groups": resource["spec"]["groups"]}, sort_keys=False))
    return path


def render(template: str, labels: dict[str, str], value: str) -> str:
    """Expected text of an annotation: labels substituted, the value as Prometheus formats it."""
    text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], template)
    return re.sub(r"\{\{[^}]*\$value[^}]*\}\}", value, text)


# alert -> (input series, [(eval minute, {run_id of the firing alert: its rendered value} )]).
# Every case has a "bad" run that must fire and a "good" run that must not.
CASES = {
    "ErwTrainingStalled": (
        [
            # Steps until minute 5, then nothing: the timestamp freezes at 300 s.
            series("erw_last_step_timestamp_seconds", per_minute(lambda m: 60 * min(m, 5)), run_id="bad"),
            series("erw_last_step_timestamp_seconds", per_minute(lambda m: 60 * m), run_id="good"),
        ],
        [(15, {}), (25, {"bad": "20m 0s"})],
    ),
    "ErwNonFiniteLoss": (
        [
            # Three skipped steps at minutes 11-13, then healthy again.
            series("erw_nonfinite_steps_total", per_minute(lambda m: min(max(m - 10, 0), 3)), run_id="bad"),
            series("erw_nonfinite_steps_total", per_minute(lambda m: 0), run_id="good"),
        ],
        [(10, {}), (15, {"bad": "3"}), (40, {})],
    ),
    "ErwLoaderStarvation": (
        [
            series("erw_step_seconds_sum", per_minute(lambda m: 60 * m), run_id="bad"),
            series("erw_data_wait_seconds_sum", per_minute(lambda m: 30 * m), run_id="bad"),  # 50% waiting
            series("erw_step_seconds_sum", per_minute(lambda m: 60 * m), run_id="good"),
            series("erw_data_wait_seconds_sum", per_minute(lambda m: 6 * m), run_id="good"),  # 10% waiting
        ],
        [(8, {}), (20, {"bad": "50%"})],  # pending before it has lasted 10 minutes
    ),
    "ErwCheckpointFailing": (
        [
            series("erw_checkpoint_failures_total", per_minute(lambda m: 1 if m >= 5 else 0), run_id="bad"),
            series("erw_checkpoint_failures_total", per_minute(lambda m: 0), run_id="good"),
        ],
        [(4, {}), (20, {"bad": "1"})],
    ),
    "ErwCheckpointOverdue": (
        [
            # 10 steps a minute, checkpoint interval 50 steps. "bad" never checkpoints after step 0.
            series("erw_step", per_minute(lambda m: 10 * m), run_id="bad"),
            series("erw_checkpoint_last_success_step", per_minute(lambda m: 0), run_id="bad"),
            series("erw_checkpoint_interval_steps", per_minute(lambda m: 50), run_id="bad"),
            series("erw_step", per_minute(lambda m: 10 * m), run_id="good"),
            series("erw_checkpoint_last_success_step", per_minute(lambda m: 50 * (m // 5)), run_id="good"),
            series("erw_checkpoint_interval_steps", per_minute(lambda m: 50), run_id="good"),
            # Interval unknown (0): no way to call it overdue.
            series("erw_step", per_minute(lambda m: 10 * m), run_id="unknown"),
            series("erw_checkpoint_last_success_step", per_minute(lambda m: 0), run_id="unknown"),
            series("erw_checkpoint_interval_steps", per_minute(lambda m: 0), run_id="unknown"),
        ],
        [(10, {}), (15, {"bad": "150"})],
    ),
    "ErwRunRestarted": (
        [
            # The pod of "bad" dies at minute 10; its replacement starts at minute 11 (new pod name).
            series(
                "erw_process_start_time_seconds", per_minute(lambda m: 100 if m <= 10 else None), run_id="bad", pod="a"
            ),
            series(
                "erw_process_start_time_seconds", per_minute(lambda m: 700 if m >= 11 else None), run_id="bad", pod="b"
            ),
            series("erw_process_start_time_seconds", per_minute(lambda m: 50), run_id="good", pod="c"),
        ],
        [(10, {}), (20, {"bad": "1"}), (85, {})],  # resolves an hour after the restart
    ),
}


def unit_tests() -> dict:
    by_name = {rule["alert"]: rule for rule in rules()}
    tests = []
    for alert, (input_series, checks) in CASES.items():
        rule = by_name[alert]
        alert_tests = []
        for minute, firing in checks:
            expected = []
            for run_id, value in firing.items():
                labels = {"namespace": BASE["namespace"], "phase": BASE["phase"], "run_id": run_id}
                expected.append(
                    {
                        "exp_labels": {**labels, **rule["labels"]},
                        "exp_annotations": {k: render(v, labels, value) for k, v in rule["annotations"].items()},
                    }
                )
            alert_tests.append({"eval_time": f"{minute}m", "alertname": alert, "exp_alerts": expected})
        tests.append({"interval": "1m", "input_series": input_series, "alert_rule_test": alert_tests})
    return {"rule_files": ["erw.rules.yml"], "evaluation_interval": "30s", "tests": tests}


def test_rules_pass_promtool_check(tmp_path):
    promtool = require_binary("promtool")
    result = subprocess.run(
        [promtool, "check", "rules", str(write_rules_file(tmp_path))], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_documented_and_tested():
    for rule in rules():
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
    assert set(CASES) == {rule["alert"] for rule in rules()}


def test_alerts_fire_on_bad_runs_only(tmp_path):
    promtool = require_binary("promtool")
    write_rules_file(tmp_path)
    (tmp_path / "erw.test.yml").write_text(yaml.safe_dump(unit_tests(), sort_keys=False))
    result = subprocess.run([promtool, "test", "rules", "erw.test.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("alert", sorted(CASES))
def test_each_case_can_fail(alert, tmp_path):
    """A healthy-only expectation at the bad run's firing time must make promtool fail."""
    promtool = require_binary("promtool")
    write_rules_file(tmp_path)
    suite = unit_tests()
    case = next(t for t in suite["tests"] if t["alert_rule_test"][0]["alertname"] == alert)
    case["alert_rule_test"] = [{**c, "exp_alerts": []} for c in case["alert_rule_test"] if c["exp_alerts"]]
    suite["tests"] = [case]
    (tmp_path / "erw.test.yml").write_text(yaml.safe_dump(suite, sort_keys=False))
    result = subprocess.run([promtool, "test", "rules", "erw.test.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0, f"{alert} did not fire on its bad series"
