"""Every PromQL query in deploy/ (alert rules, dashboard panels, dashboard variables) parses and
reads only series the gateway exports, with labels those series carry.

Fast checks compare loraplex_* series with gateway/metrics.py's declarations; the live check
scrapes the real gateway (its embedded vLLM engine included) and compares everything."""

from __future__ import annotations

import re

import pytest

from tests.deploy.conftest import run
from tests.deploy.promql import (
    Query,
    alert_queries,
    dashboard_queries,
    declared_metrics,
    declared_series,
    exposition_series,
    grafana_to_promql,
    joined_label_values,
    problems,
    reads,
    series_of,
)

QUERIES = alert_queries() + dashboard_queries()
LORAPLEX = ("loraplex_",)
EXPORTED = ("loraplex_", "vllm:")


def test_queries_are_found():
    wheres = {query.where.split(":")[0] for query in QUERIES}
    assert wheres == {"alerts.yml", "dashboard"}
    assert len(QUERIES) > 40
    assert any(query.where.startswith("dashboard: variable $tenant") for query in QUERIES)


@pytest.mark.parametrize("query", QUERIES, ids=[query.where for query in QUERIES])
def test_query_parses(query: Query):
    assert "$" not in query.promql, "a Grafana variable was left in"
    found = reads(query.promql)
    assert found.names, "reads no series"


def test_queries_read_only_declared_loraplex_series():
    declared = declared_series()
    found = [problem for query in QUERIES for problem in problems(query, declared, LORAPLEX)]
    assert found == []


def test_every_declared_metric_has_a_panel():
    """A metric nobody can see is a metric nobody reads: each declared series family shows."""
    read = set().union(*(reads(q.promql).names for q in dashboard_queries()))
    missing = {
        metric._name
        for metric in declared_metrics()
        if not read & set(series_of(metric._name, metric._type))
    }
    assert missing == set()


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('sum(rate(loraplex_request_total{tenant=~"$tenant"}[5m]))', "is not exported"),
        ("sum by (tennant) (rate(loraplex_requests_total[5m]))", "groups on label(s) ['tennant']"),
        ('sum(loraplex_requests_in_flight{version="1"})', "has no label(s) ['version']"),
        (
            "histogram_quantile(0.9, sum by (adapter, le) "
            "(rate(loraplex_adapter_load_duration_seconds_bucket[5m])))",
            "groups on label(s) ['adapter']",
        ),
        ("loraplex_engine_up_total", "is not exported"),
    ],
)
def test_the_series_check_catches_mistakes(expr, expected):
    query = Query("control", expr, grafana_to_promql(expr))
    found = problems(query, declared_series(), LORAPLEX)
    assert len(found) == 1 and expected in found[0], found


@pytest.mark.parametrize(
    "bad", ["sum(rate(loraplex_requests_total[5m])", "rate(loraplex_requests_total[5x])", "a +"]
)
def test_the_parser_rejects_broken_queries(bad):
    with pytest.raises(ValueError):
        reads(bad)


def test_the_label_check_catches_joined_lists():
    text = (
        "# TYPE vllm:lora_requests_info gauge\n"
        'vllm:lora_requests_info{running_lora_adapters="a,b",waiting_lora_adapters=""} 1\n'
        "# TYPE loraplex_requests_in_flight gauge\n"
        'loraplex_requests_in_flight{tenant="acme",adapter="bot"} 1\n'
    )
    assert joined_label_values(text) == {("vllm:lora_requests_info", "running_lora_adapters")}


def test_grafana_variables_are_substituted():
    expr = 'rate(x{a=~"$tenant", b=~"${adapter}", c=~"[[version]]"}[$__rate_interval])'
    assert grafana_to_promql(expr) == 'rate(x{a=~".*", b=~".*", c=~".*"}[1m])'


# --- against the real gateway ------------------------------------------------------------


@pytest.fixture(scope="module")
def scrape(gateway) -> str:
    return str(gateway.metrics_text())


@pytest.mark.engine
def test_queries_read_only_series_the_live_gateway_exports(scrape):
    exposed = exposition_series(scrape)
    declared = declared_series()
    # Names from the scrape; labels from the declarations where the scrape has no sample yet.
    known = {name: declared.get(name) or labels for name, labels in exposed.items()}
    found = [problem for query in QUERIES for problem in problems(query, known, EXPORTED)]
    assert found == []
    # Sanity: the engine's metrics really are on the same endpoint.
    assert {"vllm:num_requests_running", "vllm:kv_cache_usage_perc"} <= exposed.keys()


@pytest.mark.engine
def test_live_gateway_exports_every_declared_metric(scrape):
    missing = declared_series().keys() - exposition_series(scrape).keys()
    # prometheus-client writes no _created series when PROMETHEUS_DISABLE_CREATED_SERIES is set.
    assert {name for name in missing if not name.endswith("_created")} == set()


# The only lint findings vLLM's families may have: upstream's naming, which the gateway passes
# through unchanged (a colon, the recording-rule convention; a histogram named `_total`).
UPSTREAM_NAMING = re.compile(
    r"^vllm:\w+ (metric names should not contain ':'"
    r"""|non-counter metrics should not have "_total" suffix)$"""
)


@pytest.mark.engine
def test_live_exposition_passes_promtool_lint(scrape, promtool):
    """`promtool check metrics`: loraplex_* and the client's own metrics are lint-clean, and
    vLLM's are reported only for upstream's naming; any other finding fails, vLLM's too."""
    result = run(promtool, "check", "metrics", stdin=scrape)
    # 0: clean; 3: lint findings (listed on stderr); anything else: the exposition is broken.
    assert result.returncode in (0, 3), result.stdout + result.stderr
    findings = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert findings, "expected vLLM's colon names to be reported"
    assert [line for line in findings if not UPSTREAM_NAMING.match(line)] == []


@pytest.mark.engine
def test_live_exposition_has_no_list_valued_labels(scrape):
    """Bounded labels, vLLM's included: a comma-joined list in a label value (vLLM's
    vllm:lora_requests_info: the running and waiting adapter sets) is a new series for every
    combination. The gateway leaves that family out (routes/metrics.py)."""
    assert "vllm:lora_requests_info" not in scrape
    assert joined_label_values(scrape) == set()
