"""deploy/prometheus: the config and the alert rules load in promtool, every alert fires past
its threshold and stays quiet short of it (alerts_test.yml), and each one says what to do."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import run
from tests.deploy.promql import ALERTS, DEPLOY

PROMETHEUS = DEPLOY / "prometheus"
CONFIG = PROMETHEUS / "prometheus.yml"
RULE_TESTS = PROMETHEUS / "alerts_test.yml"
GATEWAY_JOB = "loraplex-gateway"
# A gateway pod found by its prometheus.io/* annotations: its labels, through the usual labelmap.
ANNOTATED_GATEWAY = 'up{app_kubernetes_io_name="loraplex", app_kubernetes_io_component="gateway"}'


def rules() -> list[dict]:
    return [
        rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
    ]


def test_config_and_its_rule_files_are_valid(promtool):
    result = run(promtool, "check", "config", str(CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


def test_alert_rules_are_valid(promtool):
    result = run(promtool, "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_unit_tests(promtool):
    result = run(promtool, "test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


# Each edit moves a threshold, a window or a branch of one alert; alerts_test.yml must notice.
MUTATIONS = {
    "error ratio 5 % → 20 %": (") > 0.05", ") > 0.2"),
    "error ratio 5 % → 1 %": (") > 0.05", ") > 0.01"),
    "error minimum 5 → 1": (">= 5", ">= 1"),
    "e2e SLA 10 s → 20 s": (") > 10", ") > 20"),
    "e2e SLA 10 s → 9 s": (") > 10", ") > 9"),
    "TTFT SLA 2 s → 3 s": (") > 2", ") > 3"),
    "4xx counted as errors": ('{status=~"5.."}[5m]))\n', '{status=~"[45].."}[5m]))\n'),
    "rollback: increase() only": (
        "(loraplex_rollbacks_total > 0 unless loraplex_rollbacks_total offset 5m)",
        "(vector(0) == 1)",
    ),
    "rollback: new series only": (
        "(increase(loraplex_rollbacks_total[5m]) > 0)",
        "(vector(0) == 1)",
    ),
    "rollback: series born at 0 count": (
        "(loraplex_rollbacks_total > 0 unless",
        "(loraplex_rollbacks_total unless",
    ),
    "engine down never": ("loraplex_engine_up == 0", "loraplex_engine_up == 2"),
    "gateway missing from config not noticed": (
        'absent(up{job="loraplex-gateway"})',
        "(vector(0) == 1)",
    ),
    "annotation-scraped gateway down not noticed": (
        "or\n" + " " * 14 + ANNOTATED_GATEWAY + "\n",
        "\n",
    ),
    "annotation-scraped gateway taken for missing": (
        "and on ()\n" + " " * 14 + f"absent({ANNOTATED_GATEWAY})",
        "",
    ),
    "any loraplex pod taken for the gateway": (
        ANNOTATED_GATEWAY + "\n" + " " * 10 + ") == 0",
        'up{app_kubernetes_io_name="loraplex"}\n' + " " * 10 + ") == 0",
    ),
    "rate-limit surge 1/s → 2/s": ("rate_limited_total[5m])) > 1", "rate_limited_total[5m])) > 2"),
    "auth surge 1/s → 0.8/s": ("auth_failures_total[5m])) > 1", "auth_failures_total[5m])) > 0.8"),
}


@pytest.mark.parametrize("change", MUTATIONS.values(), ids=MUTATIONS.keys())
def test_rule_unit_tests_pin_every_threshold(promtool, tmp_path: Path, change):
    before, after = change
    text = ALERTS.read_text()
    assert before in text, f"alerts.yml changed: update this mutation ({before!r})"
    (tmp_path / ALERTS.name).write_text(text.replace(before, after, 1))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    assert run(promtool, "check", "rules", str(tmp_path / ALERTS.name)).returncode == 0
    result = run(promtool, "test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0, f"alerts_test.yml does not notice: {before!r} → {after!r}"


def test_every_alert_is_documented():
    found = rules()
    assert len(found) >= 8
    for rule in found:
        name = rule["alert"]
        assert name.startswith("Loraplex"), name
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        notes = rule["annotations"]
        assert {"summary", "description", "runbook"} <= notes.keys(), name
        assert "\n" not in notes["runbook"].strip(), f"{name}: runbook is one line"
        assert len(notes["runbook"]) > 40, f"{name}: runbook says what to do"


def test_every_alert_has_unit_tests():
    tested = RULE_TESTS.read_text()
    for rule in rules():
        assert f'alertname="{rule["alert"]}"' in tested or (
            f"alertname: {rule['alert']}" in tested
        ), f"{rule['alert']} has no case in alerts_test.yml"


def test_the_alerts_cover_the_runbook_list():
    names = {rule["alert"] for rule in rules()}
    exprs = " ".join(rule["expr"] for rule in rules())
    assert {
        "LoraplexRollbackFired",
        "LoraplexAdapterErrorRate",
        "LoraplexAdapterLatencyP95OverSLA",
        "LoraplexEngineDown",
        "LoraplexGatewayDown",
        "LoraplexAdapterLoadFailures",
        "LoraplexRateLimitedSurge",
        "LoraplexAuthFailureSurge",
    } <= names
    for metric in ("loraplex_rate_limited_total", "loraplex_auth_failures_total"):
        assert metric in exprs


def test_gateway_down_watches_the_scrape_job_of_the_config():
    config = yaml.safe_load(CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert GATEWAY_JOB in jobs
    assert jobs[GATEWAY_JOB].get("metrics_path", "/metrics") == "/metrics"
    gateway_down = next(rule for rule in rules() if rule["alert"] == "LoraplexGatewayDown")
    assert f'job="{GATEWAY_JOB}"' in gateway_down["expr"]
    assert config["rule_files"] == [ALERTS.name]
