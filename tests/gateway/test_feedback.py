"""POST /v1/feedback through the app: a verdict lands on the adapter version that served the
response its id names, for the tenant it was served to only, once; a safety incident or
failing task success rolls the owner's canary back, and another tenant's feedback never does."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from tests.gateway.fake_engine import BASE, ScriptedEngine, client_for
from tests.gateway.rollout_helpers import ADMIN, FILES, build_demo_root, register, wait_for

WINDOW = 10
SECRET = "feedback-secret-for-tests-0123456789"


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_root(tmp_path_factory.mktemp("feedback"))


def complete(client, model: str, headers: dict[str, str] | None = None, **body) -> str:
    payload = {"model": model, "prompt": "x", "max_tokens": 1, **body}
    response = client.post("/v1/completions", json=payload, headers=headers or {})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def feedback(client, response_id: str, outcome: str, headers: dict[str, str] | None = None):
    return client.post(
        "/v1/feedback", json={"id": response_id, "outcome": outcome}, headers=headers or {}
    )


def counted(tenant: str, adapter: str, version: str, outcome: str) -> float:
    labels = {"tenant": tenant, "adapter": adapter, "version": version, "outcome": outcome}
    return REGISTRY.get_sample_value("loraplex_feedback_total", labels) or 0.0


def new_tenant(client) -> dict[str, str]:
    name = f"t{uuid.uuid4().hex[:8]}"
    assert client.post("/admin/v1/tenants", json={"name": name}, headers=ADMIN).is_success
    key = client.post(f"/admin/v1/tenants/{name}/keys", headers=ADMIN).json()["key"]
    return {"name": name, "Authorization": f"Bearer {key}"}


def test_a_verdict_is_counted_once_for_the_version_that_served_it(demo_root):
    with client_for(demo_root, ScriptedEngine(["a"])) as client:
        register(client, demo_root, "fb-counted", "v1")
        response_id = complete(client, "fb-counted")
        first = feedback(client, response_id, "success")
        assert first.status_code == 200, first.text
        assert first.json() == {
            "object": "feedback",
            "id": response_id,
            "outcome": "success",
            "model": "fb-counted",
            "duplicate": False,
        }
        assert counted(client.tenant, "fb-counted", "1", "success") == 1
        # The call itself is counted for the version its response came from, not the base.
        calls = {
            "tenant": client.tenant,
            "adapter": "fb-counted",
            "version": "1",
            "route": "feedback",
            "status": "200",
        }
        assert REGISTRY.get_sample_value("loraplex_requests_total", calls) == 1

        again = feedback(client, response_id, "success")  # a client's retry
        assert again.status_code == 200 and again.json()["duplicate"] is True
        assert counted(client.tenant, "fb-counted", "1", "success") == 1
        changed = feedback(client, response_id, "failure")
        assert changed.status_code == 409 and changed.json()["error"]["code"] == "feedback_conflict"
        assert counted(client.tenant, "fb-counted", "1", "failure") == 0

        chat = client.post(
            "/v1/chat/completions",
            json={"model": BASE, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
        )
        assert chat.status_code == 200
        on_base = feedback(client, chat.json()["id"], "user_correction")
        assert on_base.status_code == 200 and on_base.json()["model"] == BASE
        assert counted(client.tenant, "", "", "user_correction") == 1


def test_an_id_is_good_only_for_the_tenant_it_was_served_to(demo_root):
    with client_for(demo_root, ScriptedEngine(["a"])) as client:
        register(client, demo_root, "fb-scoped", "v1")
        response_id = complete(client, "fb-scoped")
        other = new_tenant(client)
        edited = response_id[:-3] + ("AAA" if not response_id.endswith("AAA") else "BBB")
        answers = [
            feedback(
                client, response_id, "failure", headers={"Authorization": other["Authorization"]}
            ),
            feedback(client, edited, "failure"),
            feedback(client, "cmpl-" + "0" * 32, "failure"),  # no receipt
        ]
        assert [a.status_code for a in answers] == [404] * 3
        assert len({a.content for a in answers}) == 1  # one indistinguishable answer
        assert answers[0].json()["error"]["code"] == "response_not_found"
        assert counted(other["name"], "fb-scoped", "1", "failure") == 0
        assert counted(client.tenant, "fb-scoped", "1", "failure") == 0
        unauthenticated = client.post(
            "/v1/feedback",
            json={"id": response_id, "outcome": "failure"},
            headers={"Authorization": "Bearer nope"},
        )
        assert unauthenticated.status_code == 401


@pytest.mark.parametrize(
    "body",
    [
        {"id": "x", "outcome": "great"},
        {"id": "x"},
        {"outcome": "success"},
        {"id": "x", "outcome": "success", "comment": "free text is never stored"},
        {"id": "x" * 201, "outcome": "success"},
    ],
)
def test_malformed_feedback_is_refused(demo_root, body):
    with client_for(demo_root, ScriptedEngine(["a"])) as client:
        response = client.post("/v1/feedback", json=body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["type"] == "invalid_request_error"


def test_feedback_past_the_age_limit_is_refused(demo_root):
    with client_for(demo_root, ScriptedEngine(["a"]), feedback_max_age_s=60) as client:
        register(client, demo_root, "fb-old", "v1")
        response_id = complete(client, "fb-old")
        client.app.state.feedback._clock = lambda: time.time() + 61
        late = feedback(client, response_id, "success")
        assert late.status_code == 400 and late.json()["error"]["code"] == "feedback_expired"


def test_a_replica_sharing_the_secret_accepts_the_others_ids(demo_root):
    with client_for(demo_root, ScriptedEngine(["a"]), feedback_secret=SECRET) as first:
        register(first, demo_root, "fb-shared-secret", "v1")
        response_id = complete(first, "fb-shared-secret")
        headers = {"Authorization": first.headers["Authorization"]}
    with client_for(demo_root, ScriptedEngine(["a"]), feedback_secret=SECRET) as second:
        assert feedback(second, response_id, "success", headers=headers).status_code == 200
    with client_for(demo_root, ScriptedEngine(["a"])) as third:  # a random secret
        assert feedback(third, response_id, "success", headers=headers).status_code == 404


def start_canary(client, name: str, owner: str | None = None, **form: str) -> None:
    for folder in ("v1", "v2"):
        files = [("files", (f, (client.demo_root / folder / f).read_bytes())) for f in FILES]
        body = {"name": name, "tenant": owner or client.tenant, **form}
        response = client.post("/admin/v1/adapters", data=body, files=files, headers=ADMIN)
        assert response.status_code == 201, response.text
    assert client.post(f"/admin/v1/adapters/{name}/versions/2/evaluate", headers=ADMIN)
    client.put(f"/admin/v1/rollouts/{name}/thresholds", json={"window": WINDOW}, headers=ADMIN)
    started = client.post(
        f"/admin/v1/rollouts/{name}/start", json={"version": 2, "percent": 50}, headers=ADMIN
    )
    assert started.status_code == 200, started.text


def canary_ids(client, engine, name: str, count: int, headers=None) -> list[str]:
    """Ids of `count` responses the canary (v2) served, from distinct sticky users."""
    canary_engine_id = None
    ids: list[str] = []
    for i in range(200):
        response_id = complete(client, name, headers=headers, user=f"u{i}")
        served = engine.calls[-1][1].engine_id
        if canary_engine_id is None:
            pinned = complete(client, f"{name}@2", headers=headers)
            canary_engine_id = engine.calls[-1][1].engine_id
            assert pinned
        if served == canary_engine_id:
            ids.append(response_id)
            if len(ids) == count:
                return ids
    raise AssertionError("the canary served too few requests")


def rollout(client, name: str) -> dict:
    return client.get(f"/admin/v1/rollouts/{name}", headers=ADMIN).json()


def test_a_safety_incident_rolls_the_owners_canary_back_at_once(demo_root):
    engine = ScriptedEngine(["a"])
    with client_for(demo_root, engine) as client:
        client.demo_root = demo_root
        start_canary(client, "fb-incident")
        [response_id] = canary_ids(client, engine, "fb-incident", 1)
        assert feedback(client, response_id, "safety_incident").status_code == 200
        assert wait_for(lambda: rollout(client, "fb-incident")["canary_version"] is None)
        event = rollout(client, "fb-incident")["events"][0]
        assert event["action"] == "rollback" and event["actor"] == "rollout-monitor"
        assert "safety incident" in event["reason"]
        assert event["figures"]["incident_response_id"] == response_id
        labels = {"adapter": "fb-incident", "version": "2", "reason": "safety_incident"}
        assert REGISTRY.get_sample_value("loraplex_rollbacks_total", labels) == 1


def test_failing_task_success_over_a_window_rolls_the_canary_back(demo_root):
    engine = ScriptedEngine(["a"])
    with client_for(demo_root, engine) as client:
        client.demo_root = demo_root
        start_canary(client, "fb-tasks")
        ids = canary_ids(client, engine, "fb-tasks", 2 * WINDOW)
        for response_id in ids[:WINDOW]:
            assert feedback(client, response_id, "success").status_code == 200
        assert not wait_for(lambda: rollout(client, "fb-tasks")["canary_version"] is None, 0.3)
        for response_id in ids[WINDOW:]:
            feedback(client, response_id, "failure")
            if rollout(client, "fb-tasks")["canary_version"] is None:
                break
        assert wait_for(lambda: rollout(client, "fb-tasks")["canary_version"] is None)
        assert "task success" in rollout(client, "fb-tasks")["events"][0]["reason"]


def test_another_tenants_incident_is_counted_but_never_rolls_the_owners_canary_back(demo_root):
    engine = ScriptedEngine(["a"])
    with client_for(demo_root, engine) as client:
        client.demo_root = demo_root
        start_canary(client, "fb-shared", visibility="shared")
        consumer = new_tenant(client)
        headers = {"Authorization": consumer["Authorization"]}
        ids = canary_ids(client, engine, "fb-shared", 3, headers=headers)
        for response_id in ids:
            assert feedback(client, response_id, "safety_incident", headers=headers).is_success
        assert counted(consumer["name"], "fb-shared", "2", "safety_incident") == 3
        assert not wait_for(lambda: rollout(client, "fb-shared")["canary_version"] is None, 0.5)
