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
# (before, after): the first occurrence in the file.
MUTATIONS = {
    "error ratio 5 % → 20 %": (") > 0.05", ") > 0.2"),
    "error ratio 5 % → 1 %": (") > 0.05", ") > 0.01"),
    "error minimum 5 → 1": (">= 5", ">= 1"),
    "e2e SLA 10 s → 20 s": (") > 10", ") > 20"),
    "e2e SLA 10 s → 9 s": (") > 10", ") > 9"),
    "TTFT SLA 2 s → 3 s": (") > 2", ") > 3"),
    "4xx counted as errors": (
        '{route!="feedback", status=~"5.."}[5m]))\n',
        '{route!="feedback", status=~"[45].."}[5m]))\n',
    ),
    "rollback: increase() only": (
        "loraplex_rollbacks_total > 0\n            unless",
        "(vector(0) == 1)\n            unless",
    ),
    "rollback: new series only": (
        "(increase(loraplex_rollbacks_total[5m]) > 0)",
        "(vector(0) == 1)",
    ),
    "rollback: series born at 0 count": (
        "loraplex_rollbacks_total > 0\n            unless",
        "loraplex_rollbacks_total\n            unless",
    ),
    "rollback: one failed scrape re-fires old ones": (
        "present_over_time(loraplex_rollbacks_total[1h] offset 5m)",
        "loraplex_rollbacks_total offset 5m",
    ),
    "load failure: one failed scrape re-fires old ones": (
        'present_over_time(loraplex_adapter_loads_total{result!="ok"}[1h] offset 10m)',
        'loraplex_adapter_loads_total{result!="ok"} offset 10m',
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
    "e2e p95 → p50": (
        "histogram_quantile(0.95,\n            sum by (adapter, le) (\n",
        "histogram_quantile(0.5,\n            sum by (adapter, le) (\n",
    ),
    "e2e p95 per version": (
        "sum by (adapter, le) (\n              rate(loraplex_request_duration",
        "sum by (adapter, version, le) (\n              rate(loraplex_request_duration",
    ),
    "e2e p95 of every outcome (errors too)": ('_bucket{outcome=~"ok|client_closed"}', "_bucket"),
    "task success 90 % → 88 %": (") < 0.9", ") < 0.88"),
    "task success 90 % → 92 %": (") < 0.9", ") < 0.92"),
    "task feedback minimum 100 → 80": (">= 100", ">= 80"),
    "task success counts every outcome": (
        '{outcome=~"success|failure"}[1h]))\n          ) < 0.9',
        "[1h]))\n          ) < 0.9",
    ),
    "safety incident: increase() only": (
        'loraplex_feedback_total{outcome="safety_incident"} > 0\n            unless',
        "(vector(0) == 1)\n            unless",
    ),
    "safety incident: new series only": (
        '(increase(loraplex_feedback_total{outcome="safety_incident"}[10m]) > 0)',
        "(vector(0) == 1)",
    ),
    "safety incident: any feedback": (
        '(increase(loraplex_feedback_total{outcome="safety_incident"}[10m]) > 0)',
        "(increase(loraplex_feedback_total[10m]) > 0)",
    ),
    "e2e p95 of successes only (abandoned unseen)": (
        '_bucket{outcome=~"ok|client_closed"}',
        '_bucket{outcome="ok"}',
    ),
}

# (alert, before, after): every occurrence inside that alert's rule. `for:` from both sides,
# and each window made longer (a recovery still firing) and shorter (firing too early or
# dropped too soon).
SCOPED_MUTATIONS = {
    "gateway down for 5m → 4m": ("LoraplexGatewayDown", "for: 5m", "for: 4m"),
    "gateway down for 5m → 6m": ("LoraplexGatewayDown", "for: 5m", "for: 6m"),
    "gateway down for 5m → 1m": ("LoraplexGatewayDown", "for: 5m", "for: 1m"),
    "engine down for 1m → 0m": ("LoraplexEngineDown", "for: 1m", "for: 0m"),
    "engine down for 1m → 2m": ("LoraplexEngineDown", "for: 1m", "for: 2m"),
    "error ratio for 5m → 4m": ("LoraplexAdapterErrorRate", "for: 5m", "for: 4m"),
    "error ratio for 5m → 6m": ("LoraplexAdapterErrorRate", "for: 5m", "for: 6m"),
    "error ratio for 5m → 0m": ("LoraplexAdapterErrorRate", "for: 5m", "for: 0m"),
    "error ratio window 5m → 1h": ("LoraplexAdapterErrorRate", "[5m]", "[1h]"),
    "error ratio window 5m → 2m": ("LoraplexAdapterErrorRate", "[5m]", "[2m]"),
    "e2e p95 for 10m → 9m": ("LoraplexAdapterLatencyP95OverSLA", "for: 10m", "for: 9m"),
    "e2e p95 for 10m → 11m": ("LoraplexAdapterLatencyP95OverSLA", "for: 10m", "for: 11m"),
    "e2e p95 for 10m → 0m": ("LoraplexAdapterLatencyP95OverSLA", "for: 10m", "for: 0m"),
    "e2e p95 window 5m → 1h": ("LoraplexAdapterLatencyP95OverSLA", "[5m]", "[1h]"),
    "e2e p95 window 5m → 2m": ("LoraplexAdapterLatencyP95OverSLA", "[5m]", "[2m]"),
    "TTFT p95 for 10m → 9m": ("LoraplexAdapterTTFTP95OverSLA", "for: 10m", "for: 9m"),
    "TTFT p95 for 10m → 11m": ("LoraplexAdapterTTFTP95OverSLA", "for: 10m", "for: 11m"),
    "TTFT p95 for 10m → 0m": ("LoraplexAdapterTTFTP95OverSLA", "for: 10m", "for: 0m"),
    "TTFT p95 window 5m → 1h": ("LoraplexAdapterTTFTP95OverSLA", "[5m]", "[1h]"),
    "TTFT p95 window 5m → 2m": ("LoraplexAdapterTTFTP95OverSLA", "[5m]", "[2m]"),
    "giving up for 10m → 9m": ("LoraplexAdapterClientsGivingUp", "for: 10m", "for: 9m"),
    "giving up for 10m → 11m": ("LoraplexAdapterClientsGivingUp", "for: 10m", "for: 11m"),
    "giving up window 5m → 1h": ("LoraplexAdapterClientsGivingUp", "[5m]", "[1h]"),
    "giving up window 5m → 2m": ("LoraplexAdapterClientsGivingUp", "[5m]", "[2m]"),
    "giving up share 20 % → 25 %": ("LoraplexAdapterClientsGivingUp", ") > 0.2", ") > 0.25"),
    "giving up share 20 % → 15 %": ("LoraplexAdapterClientsGivingUp", ") > 0.2", ") > 0.15"),
    "giving up minimum 5 → 1": ("LoraplexAdapterClientsGivingUp", ">= 5", ">= 1"),
    "giving up share of refusals too": (
        "LoraplexAdapterClientsGivingUp",
        ', status=~"2..|499|5.."}',
        "}",
    ),
    "giving up counts /v1/models": (
        "LoraplexAdapterClientsGivingUp",
        'route=~"chat|completions", ',
        "",
    ),
    "feedback calls counted in the error ratio": (
        "LoraplexAdapterErrorRate",
        'route!="feedback", ',
        "",
    ),
    "feedback calls counted in the error ratio's denominator": (
        "LoraplexAdapterErrorRate",
        '{route!="feedback"}[5m]',
        "[5m]",
    ),
    "rollback window 5m → 1h": ("LoraplexRollbackFired", "[5m]", "[1h]"),
    "safety incident window 10m → 1h": ("LoraplexSafetyIncident", "[10m]", "[1h]"),
    "safety incident window 10m → 2m": ("LoraplexSafetyIncident", "[10m]", "[2m]"),
    "task success window 1h → 10m": ("LoraplexTaskSuccessLow", "[1h]", "[10m]"),
    "task success window 1h → 2h": ("LoraplexTaskSuccessLow", "[1h]", "[2h]"),
    "load failure window 10m → 1h": ("LoraplexAdapterLoadFailures", "[10m]", "[1h]"),
    "load failure window 10m → 2m": ("LoraplexAdapterLoadFailures", "[10m]", "[2m]"),
    "rate-limit surge for 10m → 9m": ("LoraplexRateLimitedSurge", "for: 10m", "for: 9m"),
    "rate-limit surge for 10m → 11m": ("LoraplexRateLimitedSurge", "for: 10m", "for: 11m"),
    "rate-limit surge for 10m → 0m": ("LoraplexRateLimitedSurge", "for: 10m", "for: 0m"),
    "rate-limit surge window 5m → 1h": ("LoraplexRateLimitedSurge", "[5m]", "[1h]"),
    "rate-limit surge window 5m → 1m": ("LoraplexRateLimitedSurge", "[5m]", "[1m]"),
    "auth surge for 10m → 9m": ("LoraplexAuthFailureSurge", "for: 10m", "for: 9m"),
    "auth surge for 10m → 11m": ("LoraplexAuthFailureSurge", "for: 10m", "for: 11m"),
    "auth surge window 5m → 1h": ("LoraplexAuthFailureSurge", "[5m]", "[1h]"),
    "auth surge window 5m → 1m": ("LoraplexAuthFailureSurge", "[5m]", "[1m]"),
    "limits store down for 2m → 1m": ("LoraplexLimitStoreDown", "for: 2m", "for: 1m"),
    "limits store down for 2m → 3m": ("LoraplexLimitStoreDown", "for: 2m", "for: 3m"),
    "limits store down == 0 → < 2": ("LoraplexLimitStoreDown", "== 0", "< 2"),
    "prompt drift for 1h → 50m": ("LoraplexPromptDrift", "for: 1h", "for: 50m"),
    "prompt drift for 1h → 70m": ("LoraplexPromptDrift", "for: 1h", "for: 70m"),
    "prompt drift limit ignored": (
        "LoraplexPromptDrift",
        "max by (adapter, version) (loraplex_prompt_drift_limit_ratio)",
        "1.5",
    ),
    "prompt drift: min over replicas": (
        "LoraplexPromptDrift",
        "max by (adapter, version) (loraplex_prompt_drift_ratio)",
        "min by (adapter, version) (loraplex_prompt_drift_ratio)",
    ),
}

ALERT_START = "      - alert: "


def mutated(text: str, alert: str | None, before: str, after: str) -> str:
    if alert is None:
        assert before in text, f"alerts.yml changed: update this mutation ({before!r})"
        return text.replace(before, after, 1)
    blocks = text.split(ALERT_START)
    found = [i for i, block in enumerate(blocks) if block.startswith(alert + "\n")]
    assert len(found) == 1, f"no alert {alert} in alerts.yml"
    block = blocks[found[0]]
    assert before in block, f"alerts.yml changed: update this mutation ({alert}: {before!r})"
    blocks[found[0]] = block.replace(before, after)
    return ALERT_START.join(blocks)


CHANGES = [(None, *change) for change in MUTATIONS.values()] + list(SCOPED_MUTATIONS.values())


@pytest.mark.parametrize("change", CHANGES, ids=[*MUTATIONS.keys(), *SCOPED_MUTATIONS.keys()])
def test_rule_unit_tests_pin_every_threshold(promtool, tmp_path: Path, change):
    alert, before, after = change
    (tmp_path / ALERTS.name).write_text(mutated(ALERTS.read_text(), alert, before, after))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    assert run(promtool, "check", "rules", str(tmp_path / ALERTS.name)).returncode == 0
    result = run(promtool, "test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0, f"alerts_test.yml does not notice: {before!r} → {after!r}"


def test_every_for_duration_has_a_mutation():
    """A new alert with a `for:` gets its pair of mutations above."""
    pinned = {alert for alert, before, _ in SCOPED_MUTATIONS.values() if before.startswith("for:")}
    assert {rule["alert"] for rule in rules() if "for" in rule} <= pinned


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
