"""Manual rollouts through the admin API, and how the gateway routes by them: the canary gets
its share of callers, a caller keeps its side (user, else X-Session-Id, else key), promotion
and rollback move traffic on the next request, and transitions are counted. The scripted engine
records which adapter version each request reached. (The automatic, monitor-driven rollback
needs the real engine and is tested in tests/e2e once it lands.)"""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from tests.gateway.fake_engine import ScriptedEngine, client_for
from tests.gateway.rollout_helpers import ADMIN, build_demo_root, register


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return build_demo_root(tmp_path_factory.mktemp("rollout"))


def served_version(client, engine, name: str, user: str | None = None, **headers) -> int:
    body = {"model": name, "prompt": "x", "max_tokens": 1}
    if user is not None:
        body["user"] = user
    response = client.post("/v1/completions", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return engine.calls[-1][1].engine_id


def start_half_canary(client, engine, demo_root, name: str) -> int:
    """v1 stable, v2 evaluated and rolled out to 50 %; returns v1's engine id."""
    register(client, demo_root, name, "v1")
    stable = served_version(client, engine, name)
    register(client, demo_root, name, "v2")
    client.post(f"/admin/v1/adapters/{name}/versions/2/evaluate", headers=ADMIN)
    started = client.post(
        f"/admin/v1/rollouts/{name}/start", json={"version": 2, "percent": 50}, headers=ADMIN
    )
    assert started.status_code == 200, started.text
    return stable


def test_canary_split_stickiness_promotion_and_rollback(demo_root):
    engine = ScriptedEngine(["a"])
    name = "rolled"
    with client_for(demo_root, engine) as client:
        register(client, demo_root, name, "v1")
        stable = served_version(client, engine, name)
        register(client, demo_root, name, "v2")
        evaluated = client.post(f"/admin/v1/adapters/{name}/versions/2/evaluate", headers=ADMIN)
        assert evaluated.status_code == 200, evaluated.text

        started = client.post(
            f"/admin/v1/rollouts/{name}/start", json={"version": 2, "percent": 50}, headers=ADMIN
        )
        assert started.status_code == 200, started.text
        assert started.json()["canary_percent"] == 50 and started.json()["stable_version"] == 1

        users = [f"user-{i}" for i in range(60)]
        first = {u: served_version(client, engine, name, user=u) for u in users}
        canary = next(v for v in first.values() if v != stable)
        share = sum(v == canary for v in first.values()) / len(users)
        assert 0.25 < share < 0.75, share
        again = {u: served_version(client, engine, name, user=u) for u in users[:20]}
        assert all(again[u] == first[u] for u in again)  # sticky
        by_session = {
            served_version(client, engine, name, **{"X-Session-Id": "s-1"}) for _ in "abc"
        }
        assert len(by_session) == 1

        promoted = client.post(f"/admin/v1/rollouts/{name}/promote", headers=ADMIN)
        assert promoted.json()["canary_version"] is None  # 50 → 100 completes
        assert {served_version(client, engine, name, user=u) for u in users[:10]} == {canary}

        transitions = REGISTRY.get_sample_value(
            "loraplex_rollout_transitions_total",
            {"adapter": name, "version": "2", "action": "start"},
        )
        assert transitions == 1
        status = client.get(f"/admin/v1/rollouts/{name}", headers=ADMIN).json()
        actions = {e["action"] for e in status["events"]}
        assert "start" in actions and actions & {"complete", "promote"}, actions


def test_manual_rollback_sends_every_caller_back_to_stable(demo_root):
    engine = ScriptedEngine(["a"])
    name = "rolled-back"
    with client_for(demo_root, engine) as client:
        stable = start_half_canary(client, engine, demo_root, name)
        users = [f"u{i}" for i in range(30)]
        assert len({served_version(client, engine, name, user=u) for u in users}) == 2
        assert (
            REGISTRY.get_sample_value(
                "loraplex_rollout_canary_percent", {"adapter": name, "version": "2"}
            )
            == 50
        )

        rolled = client.post(
            f"/admin/v1/rollouts/{name}/rollback", json={"reason": "bad evals"}, headers=ADMIN
        )
        assert rolled.status_code == 200, rolled.text
        assert rolled.json()["rolled_back_version"] == 2
        assert {served_version(client, engine, name, user=u) for u in users} == {stable}
        assert (
            REGISTRY.get_sample_value(
                "loraplex_rollbacks_total", {"adapter": name, "version": "2", "reason": "manual"}
            )
            == 1
        )
        # The series of a canary that ended is gone, not kept at 0 until restart.
        assert (
            REGISTRY.get_sample_value(
                "loraplex_rollout_canary_percent", {"adapter": name, "version": "2"}
            )
            is None
        )
        # Pinning the rolled-back version explicitly still reaches nothing servable.
        pinned = client.post(
            "/v1/completions", json={"model": f"{name}@2", "prompt": "x", "max_tokens": 1}
        )
        assert pinned.status_code == 404


def test_a_replica_behind_the_registry_serves_stable_instead_of_failing(demo_root):
    """Another replica rolled the canary back; this one has not polled yet, so its view still
    sends half the callers to a version the registry no longer serves. Those callers must get
    the stable, never a 404 (CI caught exactly this race between two replicas)."""
    engine = ScriptedEngine(["a"])
    name = "lagging"
    with client_for(demo_root, engine) as client:
        stable = start_half_canary(client, engine, demo_root, name)
        router = client.app.state.rollout_router
        stale = router.view(name)
        assert stale is not None and stale.canary_version == 2
        rolled = client.post(
            f"/admin/v1/rollouts/{name}/rollback", json={"reason": "elsewhere"}, headers=ADMIN
        )
        assert rolled.status_code == 200, rolled.text
        # As if the rollback came from a replica this one has not heard from yet (accept()
        # refuses a view older than one it took, so the held view is put back directly).
        router._views[name] = stale
        users = [f"u{i}" for i in range(30)]
        assert {router.route(name, f"user:{u}") for u in users} >= {f"{name}@2"}
        assert {served_version(client, engine, name, user=u) for u in users} == {stable}
