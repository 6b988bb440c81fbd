"""PromQL of deploy/: every query in the alert rules and the Grafana dashboard, parsed, and the
series each one reads, to compare with what the gateway really exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import promql_parser
import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "loraplex.json"

# Series Prometheus makes itself for every target, and the labels it attaches to every scraped
# series (job, instance); a query may name them without the gateway exporting them.
SCRAPE_SERIES = {
    "up": frozenset(),
    "scrape_duration_seconds": frozenset(),
    "scrape_samples_scraped": frozenset(),
    "ALERTS": frozenset({"alertname", "alertstate", "severity"}),
}
TARGET_LABELS = frozenset({"job", "instance"})

# Grafana's built-in interval variables, replaced by a duration before parsing.
GRAFANA_DURATIONS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
_GRAFANA_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
_LABEL_VALUES = re.compile(
    r"^\s*label_values\(\s*(?:(?P<selector>.+?)\s*,\s*)?(?P<label>\w+)\s*\)\s*$"
)


@dataclass(frozen=True)
class Query:
    where: str  # "alerts.yml: LoraplexRollbackFired", "dashboard: panel 3 'Tokens/s' A"
    expr: str  # as written
    promql: str  # what is parsed: Grafana variables substituted


def grafana_to_promql(expr: str) -> str:
    """Grafana variables → values that keep the query's shape: intervals → a duration,
    template variables (used as regex matchers, `=~"$tenant"`) → `.*`."""

    def value(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        return GRAFANA_DURATIONS.get(name, ".*")

    return _GRAFANA_VARIABLE.sub(value, expr)


def alert_queries(path: Path = ALERTS) -> list[Query]:
    rules = yaml.safe_load(path.read_text())
    queries = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            queries.append(Query(f"{path.name}: {name}", rule["expr"], rule["expr"]))
    return queries


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested (collapsed) panels included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(path: Path = DASHBOARD) -> list[Query]:
    """Panel targets' `expr` and query variables; `label_values(sel, label)` yields `sel`."""
    dashboard = json.loads(path.read_text())
    queries = []
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            where = f"dashboard: panel {panel['id']} {panel['title']!r} {target['refId']}"
            queries.append(Query(where, target["expr"], grafana_to_promql(target["expr"])))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        where = f"dashboard: variable ${variable['name']}"
        match = _LABEL_VALUES.match(text)
        if match is None:
            queries.append(Query(where, text, grafana_to_promql(text)))
        elif match["selector"]:
            # The label must exist on the selector's series: checked as a grouping label.
            selector = grafana_to_promql(match["selector"])
            queries.append(Query(where, text, f"count by ({match['label']}) ({selector})"))
    return queries


@dataclass
class Reads:
    """What one expression reads: series names with the label names its matchers use, and
    the label names it groups or matches on."""

    selectors: list[tuple[str, frozenset[str]]] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)

    @property
    def names(self) -> set[str]:
        return {name for name, _ in self.selectors}


def reads(promql: str) -> Reads:
    """Parse (raises ValueError on a syntax error) and collect what the expression reads."""
    tree = promql_parser.parse(promql)
    found = Reads()

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            if not node.name:
                raise ValueError(f"selector without a metric name in {promql!r}")
            labels = frozenset(m.name for m in node.matchers.matchers if m.name != "__name__")
            found.selectors.append((node.name, labels))
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            found.grouping.update(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            if node.modifier.matching is not None:
                found.grouping.update(node.modifier.matching.labels)
            found.grouping.update(node.modifier.group_labels or [])
        return True

    promql_parser.walk(tree, pre_visit=visit)
    return found


# --- what the gateway exports --------------------------------------------------------------

SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "info": ("_info",),
}


def series_of(family: str, kind: str) -> list[str]:
    """Series names a metric family of this type exposes (also with no observation yet)."""
    return [family + suffix for suffix in SUFFIXES.get(kind, ("",))]


def declared_metrics() -> list[MetricWrapperBase]:
    """Every metric object gateway/metrics.py declares."""
    import gateway.metrics

    return [
        value for value in vars(gateway.metrics).values() if isinstance(value, MetricWrapperBase)
    ]


def declared_series() -> dict[str, frozenset[str] | None]:
    """Series name → label names, for every metric gateway/metrics.py declares."""
    series: dict[str, frozenset[str] | None] = {}
    for value in declared_metrics():
        labels = frozenset(value._labelnames)
        for name in series_of(value._name, value._type):
            extra = {"le"} if name.endswith("_bucket") else set()
            series[name] = labels | extra if not name.endswith("_created") else labels
    return series


# Series name → its label names, or None where unknown (a family with no observation yet).
Known = dict[str, frozenset[str] | None]


def exposition_series(text: str) -> Known:
    """Series of a /metrics exposition. A family declared with no observation yet (only its
    # HELP/# TYPE lines) still yields its series names, with labels unknown."""
    series: dict[str, set[str] | None] = {}
    for family in text_string_to_metric_families(text):
        for name in series_of(family.name, family.type):
            series.setdefault(name, None)
        for sample in family.samples:
            seen = series.get(sample.name) or set()
            series[sample.name] = seen | set(sample.labels)
    return {name: None if labels is None else frozenset(labels) for name, labels in series.items()}


def problems(query: Query, known: Known, prefixes: tuple[str, ...]) -> list[str]:
    """What `query` reads that `known` lacks, for series names under `prefixes`: unknown
    series, matchers on labels a series does not have, grouping on labels none of its series
    has (checked only when every series' labels are known)."""
    found = reads(query.promql)
    out = []
    available = set(TARGET_LABELS)
    complete = True
    for name, labels in found.selectors:
        if name in SCRAPE_SERIES:
            available |= SCRAPE_SERIES[name]
            continue
        if not name.startswith(prefixes):
            complete = False
            continue
        if name not in known:
            out.append(f"{query.where}: series {name} is not exported")
            complete = False
            continue
        has = known[name]
        if has is None:
            complete = False
            continue
        available |= has
        if unknown := labels - has - TARGET_LABELS:
            out.append(f"{query.where}: {name} has no label(s) {sorted(unknown)}")
    if complete and (missing := found.grouping - available):
        out.append(f"{query.where}: groups on label(s) {sorted(missing)} no series has")
    return out


def joined_label_values(text: str) -> set[tuple[str, str]]:
    """(family, label) of every label in a /metrics exposition with a comma in its value: a
    joined list, unbounded by construction."""
    return {
        (family.name, label)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        for label, value in sample.labels.items()
        if "," in value
    }
