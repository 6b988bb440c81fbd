"""/metrics names every tenant's adapters and versions in its labels: on the port tenants reach,
only Prometheus (the metrics token) or an admin may read it."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from tests.gateway.fake_engine import ADMIN_TOKEN, ScriptedEngine, client_for
from tests.gateway.rollout_helpers import build_demo_root, complete, register

METRICS_TOKEN = "scrape-token-for-tests"


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return build_demo_root(tmp_path_factory.mktemp("metrics-access"))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def refusals() -> float:
    return REGISTRY.get_sample_value("loraplex_auth_failures_total", {"reason": "metrics"}) or 0


def test_tenants_and_strangers_cannot_read_metrics_prometheus_and_admins_can(demo_root):
    with client_for(demo_root, ScriptedEngine(["a"]), metrics_token=METRICS_TOKEN) as client:
        register(client, demo_root, "secret-bot", "v1")
        assert complete(client, "secret-bot") == 200
        before = refusals()
        for headers in (
            {},  # the client's own tenant key
            {"Authorization": ""},
            bearer("wrong"),
            {"Authorization": f"Basic {METRICS_TOKEN}"},
        ):
            refused = client.get("/metrics", headers=headers)
            assert refused.status_code == 401, headers
            assert refused.json()["error"]["code"] == "invalid_metrics_token"
            assert "secret-bot" not in refused.text
        assert refusals() == before + 4
        for token in (METRICS_TOKEN, ADMIN_TOKEN):
            scraped = client.get("/metrics", headers=bearer(token))
            assert scraped.status_code == 200 and 'adapter="secret-bot"' in scraped.text


def test_without_a_metrics_token_the_admin_token_guards_metrics(demo_root):
    with client_for(demo_root, ScriptedEngine(["a"])) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=bearer(METRICS_TOKEN)).status_code == 401
        assert client.get("/metrics", headers=bearer(ADMIN_TOKEN)).status_code == 200


def test_a_gateway_without_any_token_serves_metrics_openly_and_says_so(demo_root, caplog):
    from fastapi.testclient import TestClient

    from gateway.app import create_app
    from gateway.settings import Settings

    settings = Settings(
        base_model=demo_root / "base", adapter_dir=None, data_dir=demo_root / "open-data"
    )
    with TestClient(create_app(settings, engine=ScriptedEngine(["a"]))) as client:
        assert client.get("/metrics").status_code == 200
    assert "/metrics, which names every tenant's adapters, is open" in caplog.text
