"""/v1 request metrics by tenant, adapter and version, and status, through the app with a
scripted engine (tests/e2e checks the same counters move under the real engine)."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from tests.gateway.fake_engine import BASE, ScriptedEngine, client_for


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    from gateway.demo import build_base

    root = tmp_path_factory.mktemp("metrics")
    build_base(root / "base")
    return root


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_requests_tokens_and_latency_are_labelled_by_tenant(demo_root):
    engine = ScriptedEngine(["a", "b", "c", "d"])
    with client_for(demo_root, engine) as client:
        tenant = client.tenant
        scope = {"tenant": tenant, "adapter": "", "version": ""}
        ok = client.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 4})
        assert ok.status_code == 200
        missing = client.post(
            "/v1/completions", json={"model": "nope", "prompt": "x", "max_tokens": 4}
        )
        assert missing.status_code == 404
        unauthenticated = client.post(
            "/v1/completions",
            json={"model": BASE, "prompt": "x"},
            headers={"Authorization": "Bearer wrong-key-wrong-key-wrong"},
        )
        assert unauthenticated.status_code == 401
        streamed = client.post(
            "/v1/completions",
            json={"model": BASE, "prompt": "x", "max_tokens": 3, "stream": True},
        )
        assert streamed.status_code == 200

    route = {"route": "completions"}
    assert sample("loraplex_requests_total", **scope, **route, status="200") == 2
    assert sample("loraplex_requests_total", **scope, **route, status="404") == 1
    anonymous = {"tenant": "", "adapter": "", "version": ""}
    assert sample("loraplex_requests_total", **anonymous, **route, status="401") >= 1
    assert sample("loraplex_completion_tokens_total", **scope) == 4 + 3
    assert sample("loraplex_prompt_tokens_total", **scope) > 0
    assert sample("loraplex_time_to_first_token_seconds_count", **scope) == 2
    assert sample("loraplex_time_per_output_token_seconds_count", **scope) == 2
    assert sample("loraplex_request_duration_seconds_count", **scope, **route) == 2
    assert sample("loraplex_requests_in_flight", tenant=tenant, adapter="") == 0
    assert sample("loraplex_requests_queued", tenant=tenant, adapter="") == 0
    assert sample("loraplex_auth_failures_total", reason="unknown") >= 1


def test_a_stream_that_fails_midway_counts_as_a_server_error(demo_root):
    from gateway.engine.client import EngineError

    engine = ScriptedEngine(["a", "b", "c"], fail_after=1, error=EngineError("boom"))
    with client_for(demo_root, engine) as client:
        scope = {"tenant": client.tenant, "adapter": "", "version": ""}
        body = {"model": BASE, "prompt": "x", "max_tokens": 3, "stream": True}
        assert client.post("/v1/completions", json=body).status_code == 200
    route = {"route": "completions"}
    assert sample("loraplex_requests_total", **scope, **route, status="500") == 1
    assert sample("loraplex_requests_total", **scope, **route, status="200") == 0
    assert sample("loraplex_requests_in_flight", tenant=client.tenant, adapter="") == 0
