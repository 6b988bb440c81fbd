"""AdminGate below a root path (the app mounted under a prefix, or uvicorn --root-path behind a
proxy): the router matches the path below the root path, and the gate must see the same one."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from gateway.body_limit import MULTIPART_SLACK_BYTES, limits_by_route
from tests.gateway.fake_engine import ADMIN_TOKEN, BASE, KeyedClient, ScriptedEngine, client_for
from tests.gateway.rollout_helpers import ADMIN
from tests.gateway.test_tenant_gate import post

TENANTS = "/admin/v1/tenants"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedClient]:
    from gateway.demo import build_base

    root = Path(tmp_path_factory.mktemp("admin-root-path"))
    build_base(root / "base")
    with client_for(root, ScriptedEngine(["a"])) as keyed:
        yield keyed


def new_tenant() -> dict[str, str]:
    return {"name": f"t{uuid.uuid4().hex[:8]}"}


@pytest.mark.parametrize("root_path", ["/api", "/api/", "/gateway/eu"])
@pytest.mark.parametrize("authorization", [None, "Bearer not-the-admin-token"])
def test_admin_paths_below_a_root_path_are_refused_before_the_body(
    client, root_path, authorization
):
    headers = {} if authorization is None else {"authorization": authorization}
    refused = post(client, TENANTS, headers, None, root_path=root_path)
    assert refused.status == 401 and refused.error()["code"] == "invalid_admin_token"
    assert refused.header("connection") == "close" and refused.header("x-request-id")
    created = post(client, TENANTS, ADMIN, new_tenant(), root_path=root_path)
    assert created.status == 201, created.body


def test_a_root_path_that_ends_inside_a_segment_is_not_stripped(client):
    """Root path /a and path /admin/v1/tenants: the router does not cut "/a" off (it is not a
    whole segment) and serves the admin route, so the gate must guard it too. The gate cut it
    off, saw "dmin/v1/tenants", and let the anonymous body be read."""
    refused = post(client, "dmin/v1/tenants", {}, None, root_path="/a")
    assert refused.status == 401 and refused.error()["code"] == "invalid_admin_token"


def test_other_paths_below_a_root_path_are_not_admin_paths(client):
    """Mounted at /admin, the tenants' /v1 routes are /admin/v1/...: not the admin API."""
    key = {"authorization": client.headers["authorization"]}
    body = {"model": BASE, "prompt": "x", "max_tokens": 1}
    served = post(client, "/v1/completions", key, body, root_path="/admin")
    assert served.status == 200, served.body


def test_the_admins_upload_keeps_its_limit_below_a_root_path():
    """The body limit matched the whole path: behind --root-path the admin's uploads got the
    1 MiB-ish limit of every other request."""
    limit_for = limits_by_route(
        upload_max_bytes=10_000, max_request_bytes=500, admin_token=SecretStr(ADMIN_TOKEN)
    )
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/api/admin/v1/adapters",
        "root_path": "/api",
        "headers": [(b"authorization", f"Bearer {ADMIN_TOKEN}".encode())],
    }
    assert limit_for(scope) == 10_000 + MULTIPART_SLACK_BYTES
    assert limit_for({**scope, "headers": []}) == 500
