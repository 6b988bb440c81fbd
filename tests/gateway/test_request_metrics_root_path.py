"""Behind a proxy's prefix (uvicorn --root-path) /v1 requests are counted as without one: the
metrics middleware read the raw path, which then starts with the prefix, and counted nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from tests.gateway.fake_engine import BASE, ScriptedEngine, client_for
from tests.gateway.rollout_helpers import build_demo_root
from tests.gateway.test_tenant_gate import PROMPT, post


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_root(tmp_path_factory.mktemp("metrics-root-path"))


def completions_counted(tenant: str, status: str) -> float:
    labels = {
        "tenant": tenant,
        "adapter": "",
        "version": "",
        "route": "completions",
        "status": status,
    }
    return REGISTRY.get_sample_value("loraplex_requests_total", labels) or 0.0


@pytest.mark.parametrize("root_path", ["", "/api"])
def test_requests_below_a_root_path_are_counted(demo_root, root_path):
    assert PROMPT["model"] == BASE
    with client_for(demo_root, ScriptedEngine(["a"])) as client:
        key = {"authorization": client.headers["authorization"]}
        before = completions_counted(client.tenant, "200")
        answer = post(client, "/v1/completions", key, root_path=root_path)
        assert answer.status == 200
        assert completions_counted(client.tenant, "200") == before + 1
