"""Writes deploy/grafana/dashboards/loraplex.json, the loraplex Grafana dashboard, as code.

    python deploy/grafana/build_dashboard.py          # rewrite the JSON
    python deploy/grafana/build_dashboard.py --check  # exit 1 if the JSON is stale

Edit the panels in dashboard_rows_traffic.py, dashboard_rows_engine.py and
dashboard_outcomes.py (builders and filters in dashboard_panels.py), not in the JSON:
tests/deploy checks that the committed JSON equals what this script writes, that every query
parses and that it names only series the gateway exports. Panels use the provisioned
Prometheus datasource (uid in dashboard_panels.py, see provisioning/datasources).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# The panels live in sibling modules; this file also runs as a plain script and is loaded by
# path in tests/deploy, so its own folder goes on the import path first.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dashboard_panels import DATASOURCE, WIDTH, Member, Panel
from dashboard_rows_engine import engine_row, residency_row, tenancy_row
from dashboard_rows_traffic import adapter_row, overview_row, tenant_row

OUTPUT = Path(__file__).parent / "dashboards" / "loraplex.json"


def rows() -> list[tuple[str, list[Member]]]:
    """(row title, [(panel, width, height)]) in reading order."""
    return [
        ("Overview", overview_row()),
        ("Per tenant", tenant_row()),
        ("Per adapter and rollout", adapter_row()),
        ("Residency and paging", residency_row()),
        ("Engine", engine_row()),
        ("Tenancy and admin", tenancy_row()),
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
