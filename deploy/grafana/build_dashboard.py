"""Writes deploy/grafana/dashboards/loraplex.json, the loraplex Grafana dashboard, as code.

    python deploy/grafana/build_dashboard.py          # rewrite the JSON
    python deploy/grafana/build_dashboard.py --check  # exit 1 if the JSON is stale

Edit the panels here, not in the JSON: tests/deploy checks that the committed JSON equals what
this script writes, that every query parses and that it names only series the gateway exports.
Panels use the provisioned Prometheus datasource (uid below, see provisioning/datasources).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "loraplex-prometheus"}
OUTPUT = Path(__file__).parent / "dashboards" / "loraplex.json"
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
    return (
        f'sum by ({by}) (rate(loraplex_requests_total{{{labels}, status=~"5.."}}'
        f"[$__rate_interval])) / sum by ({by}) "
        f"(rate(loraplex_requests_total{{{labels}}}[$__rate_interval]))"
    )


def rows() -> list[tuple[str, list[tuple[Panel, int, int]]]]:
    """(row title, [(panel, width, height)]) in reading order."""
    overview = [
        (
            timeseries(
                "Requests/s by status",
                "Finished /v1 requests per second by HTTP status (499: the client left).",
                [
                    (
                        "sum by (status) "
                        f"(rate(loraplex_requests_total{{{SCOPE}}}[$__rate_interval]))",
                        "{{status}}",
                    )
                ],
                unit="reqps",
                stack=True,
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Time to first token",
                "Admission to the first generated token, p50 and p95.",
                quantiles("loraplex_time_to_first_token_seconds", SCOPE),
                unit="s",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "End-to-end latency",
                "Admission to last byte of successful chat/completions, p50 and p95 "
                "(alert: p95 > 10 s per adapter).",
                quantiles("loraplex_request_duration_seconds", SCOPE),
                unit="s",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Tokens/s",
                "Prompt tokens processed and tokens generated per second.",
                [
                    (
                        f"sum(rate(loraplex_prompt_tokens_total{{{SCOPE}}}[$__rate_interval]))",
                        "prompt",
                    ),
                    (
                        f"sum(rate(loraplex_completion_tokens_total{{{SCOPE}}}[$__rate_interval]))",
                        "completion",
                    ),
                ],
            ),
            8,
            8,
        ),
        (
            timeseries(
                "In flight and queued",
                "Admitted generation requests not finished, and those still waiting for "
                "their first token.",
                [
                    (f"sum(loraplex_requests_in_flight{{{TENANT_ADAPTER}}})", "in flight"),
                    (f"sum(loraplex_requests_queued{{{TENANT_ADAPTER}}})", "queued"),
                ],
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Time per output token",
                "Mean inter-token latency of a request after its first token, p50 and p95.",
                quantiles("loraplex_time_per_output_token_seconds", SCOPE),
                unit="s",
            ),
            8,
            8,
        ),
    ]
    tenant = [
        (
            timeseries(
                "Requests/s by tenant",
                'Finished /v1 requests per second per tenant ("" = not authenticated).',
                [
                    (
                        "sum by (tenant) "
                        '(rate(loraplex_requests_total{tenant=~"$tenant"}[$__rate_interval]))',
                        "{{tenant}}",
                    )
                ],
                unit="reqps",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "5xx ratio by tenant",
                "Share of each tenant's requests answered with a server error.",
                [(error_ratio("tenant", 'tenant=~"$tenant"'), "{{tenant}}")],
                unit="percentunit",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "p95 end-to-end latency by tenant",
                "95th percentile of successful generations' latency per tenant.",
                quantiles(
                    "loraplex_request_duration_seconds", 'tenant=~"$tenant"', ("tenant",), (0.95,)
                ),
                unit="s",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Generated tokens/s by tenant",
                "Tokens generated per second for each tenant.",
                [
                    (
                        "sum by (tenant) (rate(loraplex_completion_tokens_total"
                        '{tenant=~"$tenant"}[$__rate_interval]))',
                        "{{tenant}}",
                    )
                ],
            ),
            12,
            8,
        ),
        (
            timeseries(
                "In flight by tenant",
                "Admitted generation requests not yet finished, per tenant.",
                [
                    (
                        'sum by (tenant) (loraplex_requests_in_flight{tenant=~"$tenant"})',
                        "{{tenant}}",
                    )
                ],
            ),
            12,
            8,
        ),
    ]
    adapter_filter = 'adapter=~"$adapter", version=~"$version"'
    adapter = [
        (
            timeseries(
                "Requests/s by adapter version",
                'Finished requests per adapter version ("" = the base model).',
                [
                    (
                        "sum by (adapter, version) "
                        f"(rate(loraplex_requests_total{{{SCOPE}}}[$__rate_interval]))",
                        "{{adapter}} v{{version}}",
                    )
                ],
                unit="reqps",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "p95 time to first token by adapter version",
                "What the rollback monitor compares between a canary and its stable version.",
                quantiles(
                    "loraplex_time_to_first_token_seconds", SCOPE, ("adapter", "version"), (0.95,)
                ),
                unit="s",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "p95 end-to-end latency by adapter version",
                "95th percentile of successful generations' latency per adapter version.",
                quantiles(
                    "loraplex_request_duration_seconds", SCOPE, ("adapter", "version"), (0.95,)
                ),
                unit="s",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "5xx ratio by adapter version",
                "Share of requests answered with a server error (alert: > 5 % per adapter).",
                [(error_ratio("adapter, version", SCOPE), "{{adapter}} v{{version}}")],
                unit="percentunit",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Canary traffic share",
                "Percent of an adapter's traffic sent to its canary version (0: no rollout).",
                [
                    (
                        f"max by (adapter, version) (loraplex_rollout_canary_percent"
                        f"{{{adapter_filter}}})",
                        "{{adapter}} v{{version}}",
                    )
                ],
                unit="percent",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Rollout transitions",
                "Cumulative rollout transitions per version and action (start, promote, "
                "pause, resume, complete, rollback) since the gateway started: a step is an "
                "event.",
                [
                    (
                        "sum by (adapter, version, action) "
                        f"(loraplex_rollout_transitions_total{{{adapter_filter}}})",
                        "{{adapter}} v{{version}} {{action}}",
                    )
                ],
            ),
            8,
            8,
        ),
        (
            table(
                "Rollbacks by reason",
                "Rollbacks since the gateway started, per version and reason (ttft_p95, "
                "latency_p95, error_rate: automatic; manual: an operator).",
                f"sum by (adapter, version, reason) (loraplex_rollbacks_total{{{adapter_filter}}})",
                {"adapter": "adapter", "version": "version", "reason": "reason"},
            ),
            24,
            7,
        ),
    ]
    residency = [
        (
            timeseries(
                "Adapters resident by tier",
                "Adapters held in the engine's host cache and in device pool pages.",
                [("sum by (tier) (loraplex_adapters_resident)", "{{tier}}")],
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Resident adapter bytes by tier",
                "Bytes of adapter weights held per tier.",
                [("sum by (tier) (loraplex_adapter_resident_bytes)", "{{tier}}")],
                unit="bytes",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Adapter loads/s by result",
                "Loads of adapter versions into the engine: ok, refused (failed the gate's "
                "re-check), error.",
                [
                    (
                        "sum by (result) (rate(loraplex_adapter_loads_total"
                        '{adapter=~"$adapter"}[$__rate_interval]))',
                        "{{result}}",
                    )
                ],
                unit="ops",
                stack=True,
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Adapter load latency",
                "Time to load one adapter version into the engine, p50 and p95.",
                quantiles("loraplex_adapter_load_duration_seconds", ""),
                unit="s",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Adapter bytes loaded/s",
                "Adapter weight bytes loaded into the engine per second (paging traffic).",
                [("sum(rate(loraplex_adapter_load_bytes_total[$__rate_interval]))", "loaded")],
                unit="Bps",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Evictions/s by tier and reason",
                "Adapters dropped from a tier: capacity (made room), retired (version retired).",
                [
                    (
                        "sum by (tier, reason) "
                        "(rate(loraplex_adapter_evictions_total[$__rate_interval]))",
                        "{{tier}} {{reason}}",
                    )
                ],
                unit="ops",
            ),
            8,
            8,
        ),
    ]
    engine = [
        (
            stat(
                "Engine up",
                "1 while the embedded vLLM engine answers its health probe (alert after 1 m at 0).",
                "min(loraplex_engine_up)",
                steps=[(None, "red"), (1, "green")],
            ),
            4,
            8,
        ),
        (
            timeseries(
                "Engine requests running and waiting",
                "vLLM's own view: sequences in the running batch and in its waiting queue.",
                [
                    ("sum(vllm:num_requests_running)", "running"),
                    ("sum(vllm:num_requests_waiting)", "waiting"),
                ],
            ),
            10,
            8,
        ),
        (
            timeseries(
                "KV cache usage",
                "Share of the engine's KV cache blocks in use (1 = full: requests wait or are "
                "preempted).",
                [("max(vllm:kv_cache_usage_perc)", "kv cache")],
                unit="percentunit",
            ),
            10,
            8,
        ),
        (
            timeseries(
                "Engine tokens/s",
                "Prompt and generation tokens per second as counted by vLLM.",
                [
                    ("sum(rate(vllm:prompt_tokens_total[$__rate_interval]))", "prompt"),
                    ("sum(rate(vllm:generation_tokens_total[$__rate_interval]))", "generation"),
                ],
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Engine time to first token",
                "vLLM's TTFT (from its own arrival), p50 and p95: compare with the gateway's "
                "to see time spent before the engine.",
                quantiles("vllm:time_to_first_token_seconds", ""),
                unit="s",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Engine preemptions/s",
                "Sequences preempted for lack of KV cache.",
                [("sum(rate(vllm:num_preemptions_total[$__rate_interval]))", "preemptions")],
                unit="ops",
            ),
            8,
            8,
        ),
    ]
    tenancy = [
        (
            timeseries(
                "Rate-limited requests/s by tenant and limit",
                "Requests refused by a tenant limit (requests_per_second, tokens_per_minute, "
                "max_concurrent, max_tokens).",
                [
                    (
                        "sum by (tenant, limit) (rate(loraplex_rate_limited_total"
                        '{tenant=~"$tenant"}[$__rate_interval]))',
                        "{{tenant}} {{limit}}",
                    )
                ],
                unit="reqps",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Auth failures/s by reason",
                "Refused credentials: missing, malformed, unknown, revoked, expired, admin "
                "(wrong admin token).",
                [
                    (
                        "sum by (reason) (rate(loraplex_auth_failures_total[$__rate_interval]))",
                        "{{reason}}",
                    )
                ],
                unit="reqps",
                stack=True,
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Registry writes/s by operation and result",
                "Admin API writes: register, retire, delete, tenant and key management.",
                [
                    (
                        "sum by (operation, result) "
                        "(rate(loraplex_registry_operations_total[$__rate_interval]))",
                        "{{operation}} {{result}}",
                    )
                ],
                unit="ops",
            ),
            8,
            8,
        ),
    ]
    return [
        ("Overview", overview),
        ("Per tenant", tenant),
        ("Per adapter and rollout", adapter),
        ("Residency and paging", residency),
        ("Engine", engine),
        ("Tenancy and admin", tenancy),
    ]


def layout() -> list[Panel]:
    """Rows and panels with ids and grid positions, left to right, wrapping at 24 columns."""
    panels: list[Panel] = []
    y = 0
    for title, members in rows():
        panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": WIDTH, "x": 0, "y": y},
                "panels": [],
            }
        )
        y += 1
        x = 0
        row_height = 0
        for panel, width, height in members:
            if x + width > WIDTH:
                x, y = 0, y + row_height
                row_height = 0
            panels.append({**panel, "gridPos": {"h": height, "w": width, "x": x, "y": y}})
            x += width
            row_height = max(row_height, height)
        y += row_height
    for number, panel in enumerate(panels, start=1):
        panel["id"] = number
    return panels


def variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-values"},
        "definition": query,
        "refresh": 2,  # on time range change: new tenants and versions appear
        "includeAll": True,
        "multi": True,
        # ".*" rather than a joined list: also matches "" (the base model, no tenant).
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
        "hide": 0,
    }


def dashboard() -> dict[str, Any]:
    return {
        "uid": "loraplex-overview",
        "title": "loraplex",
        "description": "loraplex gateway: traffic, latency, tenants, adapters and rollouts, "
        "adapter residency, the embedded vLLM engine.",
        "tags": ["loraplex", "vllm", "lora"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {
            "list": [
                variable("tenant", "Tenant", "label_values(loraplex_requests_total, tenant)"),
                variable(
                    "adapter",
                    "Adapter",
                    'label_values(loraplex_requests_total{tenant=~"$tenant"}, adapter)',
                ),
                variable(
                    "version",
                    "Version",
                    'label_values(loraplex_requests_total{adapter=~"$adapter"}, version)',
                ),
            ]
        },
        "panels": layout(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the JSON is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            sys.stderr.write(f"{OUTPUT} is stale: run python {Path(__file__).as_posix()}\n")
            return 1
        return 0
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
