"""Two gateway replicas on one registry and one Redis (LORAPLEX_LIMITS_REDIS_URL): a tenant's
limits hold for both together, over HTTP, as its clients see them."""

from __future__ import annotations

import threading

import pytest

from tests.gateway.fake_engine import ScriptedEngine, client_for
from tests.gateway.redis_server import clear_prefix, shared_redis_url, unique_prefix
from tests.gateway.rollout_helpers import ADMIN, build_demo_root, wait_for

BODY = {"model": "loraplex-demo-base", "prompt": "x", "max_tokens": 2}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return build_demo_root(tmp_path_factory.mktemp("shared-limits"))


@pytest.fixture
def redis_settings():
    url = shared_redis_url()
    prefix = unique_prefix()
    yield {"limits_redis_url": url, "limits_redis_prefix": prefix}
    clear_prefix(url, prefix)


def replicas(demo_root, tmp_path, redis_settings, engine_a=None, engine_b=None):
    shared = {"data_dir": tmp_path / "data", "rollout_poll_interval_s": 0.05, **redis_settings}
    a = client_for(demo_root, engine_a or ScriptedEngine(["a", "b"]), **shared)
    b = client_for(demo_root, engine_b or ScriptedEngine(["a", "b"]), **shared)
    return a, b


def set_limits(client, limits: dict) -> None:
    reply = client.patch(f"/admin/v1/tenants/{client.tenant}/limits", json=limits, headers=ADMIN)
    assert reply.status_code == 200, reply.text


def test_a_tenants_request_rate_holds_across_replicas(demo_root, tmp_path, redis_settings):
    a, b = replicas(demo_root, tmp_path, redis_settings)
    with a, b:
        b.headers["Authorization"] = a.headers["Authorization"]
        set_limits(a, {"requests_per_second": 0.001, "burst": 2})
        assert wait_for(lambda: b.get("/v1/models").status_code == 200)
        statuses = [c.post("/v1/completions", json=BODY) for c in (a, b, a, b)]
        assert [r.status_code for r in statuses] == [200, 200, 429, 429]
        refusal = statuses[-1]
        assert refusal.json()["error"]["code"] == "rate_limit_exceeded"
        assert 900 <= int(refusal.headers["Retry-After"]) <= 1000  # one request per 1000 s
        metrics = b.get("/metrics", headers=ADMIN).text
        assert 'loraplex_limit_store_up{store="redis"} 1.0' in metrics


def test_concurrent_sequences_hold_across_replicas(demo_root, tmp_path, redis_settings):
    """A stream running on `a` holds the tenant's only slot: `b` refuses until it ends."""
    a, b = replicas(demo_root, tmp_path, redis_settings, ScriptedEngine(["a"] * 40, delay=0.05))
    with a, b:
        b.headers["Authorization"] = a.headers["Authorization"]
        set_limits(a, {"max_concurrent": 1})
        streaming = threading.Event()

        def stream_on_a() -> None:
            body = {**BODY, "max_tokens": 40, "stream": True}
            with a.stream("POST", "/v1/completions", json=body) as reply:
                assert reply.status_code == 200
                for _ in reply.iter_lines():
                    streaming.set()

        runner = threading.Thread(target=stream_on_a)
        runner.start()
        assert streaming.wait(10)
        refused = b.post("/v1/completions", json=BODY)
        assert refused.status_code == 429, refused.text
        assert "concurrent" in refused.json()["error"]["message"]
        runner.join(10)
        assert wait_for(lambda: b.post("/v1/completions", json=BODY).status_code == 200)
