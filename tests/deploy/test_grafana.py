"""deploy/grafana: the dashboard JSON is what build_dashboard.py writes, every panel is wired to
the provisioned datasource with a query, the grid has no overlaps, provisioning points where
the compose stack mounts it."""

from __future__ import annotations

import importlib.util
import json
from types import ModuleType

import pytest
import yaml

from tests.deploy.promql import DASHBOARD, DEPLOY, dashboard_panels

GRAFANA = DEPLOY / "grafana"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "loraplex.yml"
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
GRID_COLUMNS = 24


def builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_dashboard", GRAFANA / "build_dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict) -> list[dict]:
    return [panel for panel in dashboard_panels(dashboard) if panel["type"] != "row"]


def test_committed_json_is_what_the_builder_writes():
    assert DASHBOARD.read_text() == builder().render(), (
        "stale dashboard: run python deploy/grafana/build_dashboard.py"
    )


def test_dashboard_identity(dashboard):
    assert dashboard["uid"] == "loraplex-overview"
    assert dashboard["title"] == "loraplex"
    assert isinstance(dashboard["schemaVersion"], int)


def test_panel_ids_are_unique(dashboard):
    ids = [panel["id"] for panel in dashboard_panels(dashboard)]
    assert len(ids) == len(set(ids))
    assert all(isinstance(panel_id, int) for panel_id in ids)


def test_every_panel_has_the_provisioned_datasource_and_a_query(dashboard):
    uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    for panel in panels(dashboard):
        name = f"panel {panel['id']} {panel['title']!r}"
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, name
        assert panel["targets"], f"{name} has no target"
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), name
        for target in panel["targets"]:
            assert target["expr"].strip(), name
            assert target["datasource"]["uid"] == uid, name
        assert panel.get("title") and panel.get("description"), name


def test_grid_has_no_overlaps(dashboard):
    taken: dict[tuple[int, int], int] = {}
    for panel in dashboard_panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= GRID_COLUMNS
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"panels {taken[(x, y)]} and {panel['id']} overlap"
                taken[(x, y)] = panel["id"]


def test_rows_in_order(dashboard):
    rows = [panel["title"] for panel in dashboard["panels"] if panel["type"] == "row"]
    assert rows == [
        "Overview",
        "Per tenant",
        "Per adapter and rollout",
        "Residency and paging",
        "Engine",
        "Tenancy and admin",
    ]


def test_template_variables_filter_the_panels(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables.keys() == {"tenant", "adapter", "version"}
    for name, variable in variables.items():
        assert variable["query"]["query"].startswith("label_values("), name
        assert variable["includeAll"] and variable["allValue"] == ".*", name
        used = [
            panel["id"]
            for panel in panels(dashboard)
            if any(f"${name}" in target["expr"] for target in panel["targets"])
        ]
        assert len(used) >= 3, f"${name} filters {used}"


def test_datasource_provisioning_points_at_the_compose_prometheus():
    source = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    compose = yaml.safe_load(COMPOSE.read_text())["services"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert "prometheus" in compose
    assert any(str(port).endswith(":9090") for port in compose["prometheus"]["ports"])


def test_dashboard_provider_reads_the_folder_compose_mounts():
    provider = yaml.safe_load(PROVIDERS.read_text())["providers"][0]
    mounts = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]["volumes"]
    targets = {mount.split(":")[0]: mount.split(":")[1] for mount in mounts}
    assert targets["../grafana/dashboards"] == provider["options"]["path"]
    assert targets["../grafana/provisioning"] == "/etc/grafana/provisioning"
