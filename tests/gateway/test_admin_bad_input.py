"""Garbage sent to the tenancy, key, share and rollout admin routes: a 4xx in OpenAI's error
shape, and nothing stored."""

from __future__ import annotations

import pytest

from tests.gateway.fake_engine import ADMIN_TOKEN, ScriptedEngine, client_for

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    from gateway.demo import build_base

    root = tmp_path_factory.mktemp("bad-input")
    build_base(root / "base")
    return root


CASES = [
    ("POST", "/admin/v1/tenants", {"name": "../etc"}, 400),
    ("POST", "/admin/v1/tenants", {"name": "ok-1", "limits": {"requests_per_second": -1}}, 400),
    ("POST", "/admin/v1/tenants", {"name": "ok-2", "limits": {"burst": 3}}, 422),
    ("POST", "/admin/v1/tenants", {"name": "ok-3", "surprise": 1}, 400),
    ("PATCH", "/admin/v1/tenants/nobody/limits", {"max_tokens": 5}, 404),
    ("POST", "/admin/v1/tenants/nobody/keys", {}, 404),
    ("POST", "/admin/v1/keys/nosuchkeyid1/revoke", {}, 404),
    ("POST", "/admin/v1/adapters/nothing/shares", {"tenant": "x"}, 404),
    ("POST", "/admin/v1/rollouts/nothing/start", {"version": 1}, 404),
    ("POST", "/admin/v1/rollouts/nothing/start", {"version": 0}, 400),
    ("POST", "/admin/v1/rollouts/nothing/start", {"version": 1, "percent": 7}, 400),
    ("PUT", "/admin/v1/rollouts/nothing/thresholds", {"window": -5}, 400),
    ("PUT", "/admin/v1/rollouts/nothing/thresholds", {"min_task_success": 1.5}, 400),
    ("PUT", "/admin/v1/rollouts/nothing/thresholds", {"min_task_success": "high"}, 400),
    ("PUT", "/admin/v1/rollouts/nothing/thresholds", {"min_tool_call_validity": 1.5}, 400),
    ("PUT", "/admin/v1/rollouts/nothing/thresholds", {"min_tool_call_validity": "x"}, 400),
    ("POST", "/admin/v1/rollouts/nothing/rollback", {}, 404),
    ("POST", "/admin/v1/rollouts/nothing/shadow", {"version": 2, "percent": 10}, 404),
    ("POST", "/admin/v1/rollouts/nothing/shadow", {"version": 2, "percent": 0}, 400),
    ("POST", "/admin/v1/rollouts/nothing/shadow", {"version": 2, "percent": 101}, 400),
    ("POST", "/admin/v1/rollouts/nothing/shadow", {"version": 2}, 400),
    ("POST", "/admin/v1/rollouts/nothing/shadow", {"version": 2, "percent": 5, "x": 1}, 400),
    ("POST", "/admin/v1/rollouts/nothing/shadow", {"version": "two", "percent": 5}, 400),
    ("DELETE", "/admin/v1/rollouts/nothing/shadow", None, 404),
    ("GET", "/admin/v1/adapters?tenant=nobody", None, 404),  # as /admin/v1/keys?tenant=nobody
    ("GET", "/admin/v1/keys?tenant=nobody", None, 404),
    # PostgreSQL cannot store NUL: it was a 500 there after every check passed (review).
    ("POST", "/admin/v1/keys/nosuchkeyid1/revoke", {"reason": "a\x00b"}, 400),
    ("POST", "/admin/v1/rollouts/nothing/rollback", {"reason": "\x00"}, 400),
    # No default owner: a forgotten tenant handed a customer's adapter to tenant "default".
    ("POST", "/admin/v1/adapters/import", {"path": "/models/x", "name": "x"}, 400),
]


def test_garbage_is_a_4xx_and_stores_nothing(demo_root):
    with client_for(demo_root, ScriptedEngine(["a"])) as client:
        tenants_before = client.get("/admin/v1/tenants", headers=ADMIN).json()
        keys_before = client.get("/admin/v1/keys", headers=ADMIN).json()
        for method, path, body, status in CASES:
            response = client.request(method, path, json=body, headers=ADMIN)
            assert response.status_code == status, (method, path, body, response.text)
            error = response.json()["error"]
            assert error["message"] and error["type"] == "invalid_request_error"
        assert client.get("/admin/v1/tenants", headers=ADMIN).json() == tenants_before
        assert client.get("/admin/v1/keys", headers=ADMIN).json() == keys_before

        # A past expiry is refused and issues no key.
        past = {"expires_at": "2020-01-01T00:00:00Z"}
        refused = client.post(f"/admin/v1/tenants/{client.tenant}/keys", json=past, headers=ADMIN)
        assert refused.status_code == 422, refused.text
        assert client.get("/admin/v1/keys", headers=ADMIN).json() == keys_before
        # An expiry past a century, or past what a date can hold, is a 400, not a 500.
        keys_path = f"/admin/v1/tenants/{client.tenant}/keys"
        for days in (36501, 5_000_000, 1e300):
            body = {"expires_in_days": days}
            refused = client.post(keys_path, json=body, headers=ADMIN)
            assert refused.status_code == 400, (days, refused.text)
            assert refused.json()["error"]["param"] == "expires_in_days"
        assert client.get("/admin/v1/keys", headers=ADMIN).json() == keys_before
        # No admin token at all.
        assert client.post("/admin/v1/tenants", json={"name": "x"}).status_code == 401


def test_an_expiry_beyond_the_calendar_is_a_400_from_the_service_too(demo_root):
    """The schema bounds expires_in_days; the service still answers 400 to a caller past it."""
    from functools import partial

    from gateway.errors import InvalidRequest

    with client_for(demo_root, ScriptedEngine(["a"])) as client:
        admin = client.app.state.tenant_admin
        create = partial(admin.create_key, client.tenant, label=None, expires_at=None)
        with pytest.raises(InvalidRequest, match="too far in the future") as refused:
            client.portal.call(partial(create, expires_in_days=5_000_000, actor="admin"))
        assert refused.value.status_code == 400 and refused.value.param == "expires_in_days"
        issued = client.portal.call(partial(create, expires_in_days=36500, actor="admin"))
        assert issued.key.expires_at is not None


def test_an_upload_names_its_owner(demo_root):
    with client_for(demo_root, ScriptedEngine(["a"])) as client:
        files = [("files", ("adapter_config.json", b"{}"))]
        upload = client.post("/admin/v1/adapters", data={"name": "x"}, files=files, headers=ADMIN)
        assert upload.status_code == 400, upload.text
        assert upload.json()["error"]["param"] == "tenant"


def test_rows_stored_with_a_nul_before_the_check_are_still_shown(demo_root):
    """SQLite stored NUL characters; refusing them in responses too made GET /admin/v1/keys a
    500 (review). Only what an admin sends is checked."""
    from functools import partial

    from registry import service

    with client_for(demo_root, ScriptedEngine(["a"])) as client:
        registry = client.app.state.registry

        async def stored() -> None:
            async with registry.sessions() as session:
                create = partial(service.create_api_key, session, tenant=client.tenant)
                await create(actor="admin", label="ci\x00pipeline")

        client.portal.call(stored)
        listed = client.get("/admin/v1/keys", headers=ADMIN)
        assert listed.status_code == 200, listed.text
        assert "ci\x00pipeline" in [key["label"] for key in listed.json()]
