"""Clients that hang up on a slow canary, through the app as uvicorn drives it: a request the
client gave up on after the SLA counts as a request at least that slow, so a canary every
client abandons is still rolled back (it was never judged: only finished requests were
recorded, review); one abandoned before any bound counts as nothing. The canary's slowness is
injected latency (faults) before its first token; the stable answers at once."""

from __future__ import annotations

import asyncio

import pytest

from gateway.rollout_router import sticky_key
from registry.rollout import assign
from tests.gateway.fake_engine import ScriptedEngine, asgi_post, client_for
from tests.gateway.rollout_helpers import ADMIN, build_demo_root, register, wait_for

WINDOW = 10


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return build_demo_root(tmp_path_factory.mktemp("hang-ups"))


def slow_canary(client, demo_root, name: str, sla_ms: float) -> list[str]:
    """v1 stable, v2 in canary at 50 % with 1.5 s of latency; users the canary serves."""
    register(client, demo_root, name, "v1")
    register(client, demo_root, name, "v2")
    assert client.post(f"/admin/v1/adapters/{name}/versions/2/evaluate", headers=ADMIN).is_success
    limits = {"window": WINDOW, "sla_p95_e2e_ms": sla_ms, "margin_ms": 0}
    assert client.put(
        f"/admin/v1/rollouts/{name}/thresholds", json=limits, headers=ADMIN
    ).is_success
    start = {"version": 2, "percent": 50}
    assert client.post(f"/admin/v1/rollouts/{name}/start", json=start, headers=ADMIN).is_success
    fault = {"adapter": name, "version": 2, "latency_ms": 1500}
    assert client.post("/admin/v1/faults", json=fault, headers=ADMIN).is_success
    users = (f"u{i}" for i in range(1000))
    return [u for u in users if assign(sticky_key(u, None, ""), name, 50)][:WINDOW]


def give_up(client, name: str, users: list[str], after_s: float, *, stream: bool) -> list:
    async def scenario():
        calls = (
            asgi_post(
                client.app,
                "/v1/completions",
                {"model": name, "prompt": "x", "max_tokens": 1, "stream": stream, "user": u},
                dict(client.headers),
                hang_up_after_s=after_s,
            )
            for u in users
        )
        return await asyncio.gather(*calls)

    return [r.status for r in client.portal.call(scenario)]


def status(client, name: str) -> dict:
    return client.get(f"/admin/v1/rollouts/{name}", headers=ADMIN).json()


@pytest.mark.parametrize("stream", [True, False])
def test_a_canary_every_client_abandons_after_the_sla_is_rolled_back(demo_root, stream):
    name = f"abandoned-{'s' if stream else 'n'}"
    with client_for(demo_root, ScriptedEngine(["a"]), enable_faults=True) as client:
        users = slow_canary(client, demo_root, name, sla_ms=100)
        assert len(users) == WINDOW
        give_up(client, name, users, 0.3, stream=stream)  # 300 ms > 100 ms: late
        assert wait_for(lambda: status(client, name)["canary_version"] is None)
        shown = status(client, name)
        assert shown["stage"] == "rolled_back" and shown["rolled_back_version"] == 2
        event = shown["events"][0]
        assert event["action"] == "rollback" and event["actor"] == "rollout-monitor"
        assert event["figures"]["samples"] == WINDOW
        assert event["figures"]["p95_e2e_ms"] > 100  # past the SLA: what the clients waited


def test_clients_that_give_up_before_the_sla_count_as_nothing(demo_root):
    name = "impatient"
    with client_for(demo_root, ScriptedEngine(["a"]), enable_faults=True) as client:
        users = slow_canary(client, demo_root, name, sla_ms=1000)
        for _ in range(2):  # two windows' worth of requests abandoned at 200 ms < 1000 ms
            give_up(client, name, users, 0.2, stream=True)
        shown = status(client, name)
        assert shown["canary_version"] == 2 and f"{name}@2" not in shown["windows"]
