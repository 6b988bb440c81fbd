"""A key revoked, or expiring, while its request's body is still arriving is refused, gate or
not (found by review): the gate verifies the key when the headers arrive, and the route took
that verdict however long the body then took, so a slow upload outlived its key."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.gateway.rollout_helpers import ADMIN, build_demo_root
from tests.gateway.test_tenant_gate import COMPLETIONS, PROMPT, app_client, http_scope, without_gate


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_root(tmp_path_factory.mktemp("tenant-gate-revoke"))


async def post_revoking_before_the_body(
    app: Any, headers: dict[str, str], body: bytes, revoke: Callable[[], Awaitable[None]]
) -> int:
    """Headers first; once the app asks for the body, `revoke()`, then the body."""
    headers = {"content-type": "application/json", "content-length": str(len(body)), **headers}
    asked, answered = asyncio.Event(), asyncio.Event()
    sent = False
    start: dict[str, Any] = {}

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            asked.set()
            await revoked.wait()
            return {"type": "http.request", "body": body, "more_body": False}
        await answered.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body" and not message.get("more_body"):
            answered.set()

    revoked = asyncio.Event()
    serving = asyncio.ensure_future(app(http_scope(COMPLETIONS, headers, ""), receive, send))
    await asyncio.wait(
        {serving, asyncio.ensure_future(asked.wait())}, return_when="FIRST_COMPLETED"
    )
    await revoke()
    revoked.set()
    await serving
    return int(start["status"])


@pytest.mark.parametrize("gated", [True, False])
def test_a_key_revoked_while_the_body_arrives_is_refused(demo_root, gated):
    client = app_client(demo_root, f"revoke-{gated}")
    if not gated:
        client = without_gate(client)
    with client:
        key = client.headers["authorization"]
        assert client.post(COMPLETIONS, json=PROMPT).status_code == 200  # verified and cached

        async def revoke() -> None:
            key_id = key.split()[1]
            revoked = await asyncio.to_thread(
                client.post, f"/admin/v1/keys/{key_id}/revoke", headers=ADMIN
            )
            assert revoked.status_code == 200, revoked.text

        assert client.portal is not None
        status = client.portal.call(
            post_revoking_before_the_body,
            client.app,
            {"authorization": key},
            json.dumps(PROMPT).encode(),
            revoke,
        )
        assert status == 401


def test_a_key_that_expires_while_the_body_arrives_is_refused(demo_root):
    client = app_client(demo_root, "expiring")
    with client:
        expires = datetime.now(UTC) + timedelta(seconds=1.5)
        issued = client.post(
            f"/admin/v1/tenants/{client.tenant}/keys",
            json={"expires_at": expires.isoformat()},
            headers=ADMIN,
        )
        assert issued.status_code == 201, issued.text
        key = f"Bearer {issued.json()['key']}"
        headers = {"authorization": key}
        assert client.post(COMPLETIONS, json=PROMPT, headers=headers).status_code == 200

        async def expire() -> None:
            await asyncio.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.1)

        assert client.portal is not None
        status = client.portal.call(
            post_revoking_before_the_body, client.app, headers, json.dumps(PROMPT).encode(), expire
        )
        assert status == 401
