"""Panel builders and filters for deploy/grafana/build_dashboard.py (Grafana JSON as code)."""

from __future__ import annotations

from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "loraplex-prometheus"}
WIDTH = 24  # Grafana's grid is 24 columns wide

# Variable filters shared by the per-request series (all carry tenant, adapter, version).
SCOPE = 'tenant=~"$tenant", adapter=~"$adapter", version=~"$version"'
TENANT_ADAPTER = 'tenant=~"$tenant", adapter=~"$adapter"'

Panel = dict[str, Any]


def target(expr: str, legend: str = "", ref: int = 0, instant: bool = False) -> dict[str, Any]:
    return {
        "datasource": DATASOURCE,
        "refId": chr(ord("A") + ref),
        "expr": expr,
        "legendFormat": legend or "__auto",
        "range": not instant,
        "instant": instant,
    }


def timeseries(
    title: str,
    description: str,
    queries: list[tuple[str, str]],
    unit: str = "short",
    stack: bool = False,
    min_zero: bool = True,
) -> Panel:
    defaults: dict[str, Any] = {
        "unit": unit,
        "custom": {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10 if stack else 0,
            "showPoints": "never",
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        },
    }
    if min_zero:
        defaults["min"] = 0
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": [target(expr, legend, i) for i, (expr, legend) in enumerate(queries)],
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(
    title: str,
    description: str,
    expr: str,
    unit: str = "short",
    steps: list[tuple[float | None, str]] | None = None,
    legend: str = "",
) -> Panel:
    thresholds = [{"value": value, "color": color} for value, color in steps or [(None, "green")]]
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": [target(expr, legend)],
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "thresholds": {"mode": "absolute", "steps": thresholds},
            },
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "area",
            "textMode": "auto",
        },
    }


def table(title: str, description: str, expr: str, columns: dict[str, str]) -> Panel:
    """An instant-query table; `columns` renames label columns (others are hidden)."""
    return {
        "type": "table",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": [{**target(expr, instant=True), "format": "table"}],
        "fieldConfig": {"defaults": {"unit": "short"}, "overrides": []},
        "transformations": [
            {
                "id": "organize",
                "options": {
                    "excludeByName": {"Time": True},
                    "renameByName": {**columns, "Value": "count"},
                },
            }
        ],
        "options": {"showHeader": True, "sortBy": [{"displayName": "count", "desc": True}]},
    }


def selector(metric: str, labels: str) -> str:
    return f"{metric}{{{labels}}}" if labels else metric


def quantiles(
    metric: str, labels: str, by: tuple[str, ...] = (), qs: tuple[float, ...] = (0.5, 0.95)
) -> list[tuple[str, str]]:
    """histogram_quantile queries of `metric`_bucket, one per quantile, grouped `by`."""
    group = ", ".join((*by, "le"))
    prefix = "".join(f"{{{{{label}}}}} " for label in by)
    bucket = selector(f"{metric}_bucket", labels)
    return [
        (
            f"histogram_quantile({q}, sum by ({group}) (rate({bucket}[$__rate_interval])))",
            f"{prefix}p{round(q * 100)}",
        )
        for q in qs
    ]


def error_ratio(by: str, labels: str) -> str:
    # Feedback calls are about a version, not served by it (as in LoraplexAdapterErrorRate).
    served = f'{labels}, route!="feedback"'
    return (
        f'sum by ({by}) (rate(loraplex_requests_total{{{served}, status=~"5.."}}'
        f"[$__rate_interval])) / sum by ({by}) "
        f"(rate(loraplex_requests_total{{{served}}}[$__rate_interval]))"
    )


def given_up_ratio(by: str, labels: str) -> str:
    """Share of admitted generations (answered, failed or given up) whose client hung up."""
    generations = f'{labels}, route=~"chat|completions"'
    return (
        f'sum by ({by}) (rate(loraplex_requests_total{{{generations}, status="499"}}'
        f"[$__rate_interval])) / sum by ({by}) (rate(loraplex_requests_total"
        f'{{{generations}, status=~"2..|499|5.."}}[$__rate_interval]))'
    )


Member = tuple[Panel, int, int]  # a panel with its width (of 24 columns) and height
