"""A /v1 request's key is checked before its body is read (gateway/tenant_gate.py).

FastAPI reads and parses a route's whole body before it runs the route's dependencies, so a
caller with no key or a wrong one made the gateway take up to 16 MiB and parse it before the
401. Driven over ASGI as uvicorn drives the app; the reference for every early answer is the
same app with the gate taken out, where `require_tenant` answers as it always did.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy.exc import DBAPIError

from gateway.tenant_gate import TenantGate
from tests.gateway.fake_engine import BASE, KeyedClient, ScriptedEngine, client_for
from tests.gateway.rollout_helpers import ADMIN, build_demo_root
from tests.gateway.test_registry_outage import FailingSessions

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
PROMPT = {"model": BASE, "prompt": "x", "max_tokens": 1}
CHAT_PROMPT = {"model": BASE, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
TTL_S = 0.3  # cached keys expire within a test: an outage then needs the stale-if-error path
NO_POLL = {"rollout_poll_interval_s": 3600.0}  # a change poll would empty the key cache
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_root(tmp_path_factory.mktemp("tenant-gate"))


def app_client(demo_root: Path, name: str, **overrides: Any) -> KeyedClient:
    return client_for(
        demo_root,
        ScriptedEngine(["a"]),
        data_dir=demo_root / name,
        catalog_cache_ttl_s=TTL_S,
        **NO_POLL,
        **overrides,
    )


def without_gate(client: KeyedClient) -> KeyedClient:
    """The app as it was before the gate: `require_tenant` alone checks the key."""
    app: Any = client.app
    app.user_middleware = [m for m in app.user_middleware if m.cls is not TenantGate]
    return client


@pytest.fixture(scope="module")
def gated(demo_root: Path) -> Iterator[KeyedClient]:
    with app_client(demo_root, "gated") as client:
        yield client


@pytest.fixture(scope="module")
def ungated(demo_root: Path) -> Iterator[KeyedClient]:
    with without_gate(app_client(demo_root, "ungated")) as client:
        yield client


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v.decode() for k, v in self.headers if k == name.encode()), None)

    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = json.loads(self.body)["error"]
        return error

    def but_connection(self) -> list[tuple[bytes, bytes]]:
        return [h for h in self.headers if h[0] != b"connection"]


def http_scope(path: str, headers: dict[str, str], root_path: str) -> dict[str, Any]:
    full = root_path + path  # as uvicorn's: the path includes the root path
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": full,
        "raw_path": full.encode(),
        "query_string": b"",
        "root_path": root_path,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 80),
    }


class BodyRequested(AssertionError):
    pass


async def exchange(
    app: Any, path: str, headers: dict[str, str], body: bytes | None, root_path: str
) -> Answer:
    """POST `body`; None: the client has sent its headers (a 1 MiB JSON body declared) and
    sends the body only once answered (a slow upload, or one never finished). BodyRequested
    when the app asks for that body before it answers: the client would wait forever."""
    holding = body is None
    length = MiB if body is None else len(body)
    headers = {"content-type": "application/json", "content-length": str(length), **headers}
    answered = asyncio.Event()
    asked_unsent = asyncio.Event()
    start: dict[str, Any] = {}
    received = b""

    async def receive() -> dict[str, Any]:
        nonlocal body
        if body is not None:
            sent, body = body, None
            return {"type": "http.request", "body": sent, "more_body": False}
        if holding and not answered.is_set():
            asked_unsent.set()
        await answered.wait()  # a sent body: the route watching for a hang-up
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal received
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            received += message.get("body", b"")
            if not message.get("more_body"):
                answered.set()

    serving = asyncio.ensure_future(app(http_scope(path, headers, root_path), receive, send))
    asking = asyncio.ensure_future(asked_unsent.wait())
    await asyncio.wait({serving, asking}, return_when=asyncio.FIRST_COMPLETED)
    asking.cancel()
    if asked_unsent.is_set():
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        raise BodyRequested(f"{root_path}{path}: the app waits for the body before answering")
    serving.result()
    return Answer(start["status"], list(start["headers"]), received)


def post(
    client: KeyedClient,
    path: str,
    headers: dict[str, str],
    payload: dict[str, Any] | None = PROMPT,
    *,
    root_path: str = "",
) -> Answer:
    """POST `payload` to the client's app over ASGI; None: a body that never comes."""
    body = None if payload is None else json.dumps(payload).encode()
    assert client.portal is not None, "the client is not started"
    answer: Answer = client.portal.call(exchange, client.app, path, headers, body, root_path)
    return answer


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def wrong_key(client: KeyedClient) -> str:
    """The client's key with another secret: its key id exists, the key reads `unknown`."""
    key = client.headers["authorization"]
    return key[:-1] + ("A" if key[-1] != "A" else "B")


REFUSED = {  # Authorization header → the reason audited and counted
    None: "missing",
    "Bearer": "missing",
    "Basic abc": "malformed",
    "Bearer " + "k" * 300: "malformed",
    "wrong": "unknown",
}


def refused_headers(client: KeyedClient, authorization: str | None) -> dict[str, str]:
    headers = {"x-request-id": "same-id"}
    if authorization is not None:
        headers["authorization"] = wrong_key(client) if authorization == "wrong" else authorization
    return headers


def counters(route: str, reason: str) -> tuple[float, float]:
    anonymous = {"tenant": "", "adapter": "", "version": ""}
    return (
        sample("loraplex_requests_total", **anonymous, route=route, status="401"),
        sample("loraplex_auth_failures_total", reason=reason),
    )


def audited(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    records = [getattr(r, "audit", None) for r in caplog.records]
    return [a for a in records if a is not None and a.get("event") == "auth.failure"]


def without_key_id(audits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # A wrong key's id differs between the two apps: each has its own registry and keys.
    return [{k: v for k, v in a.items() if k != "key_id"} for a in audits]


ROUTES = [("completions", COMPLETIONS, PROMPT), ("chat", CHAT, CHAT_PROMPT)]


@pytest.mark.parametrize("route, path, payload", ROUTES)
@pytest.mark.parametrize("authorization", list(REFUSED))
def test_a_caller_without_a_valid_key_is_refused_before_its_body_arrives(
    gated, ungated, caplog, route, path, payload, authorization
):
    """The same answer, audit line and counters as `require_tenant` gave after the body was
    read (the app without the gate reads it), plus `Connection: close`: else uvicorn goes on
    reading, and dropping, the unread body to keep the connection."""
    reason = REFUSED[authorization]
    answers: list[Answer] = []
    audits: list[list[dict[str, Any]]] = []
    for client, sent in ((gated, None), (ungated, payload)):
        before = counters(route, reason)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="loraplex.audit"):
            answers.append(post(client, path, refused_headers(client, authorization), sent))
        assert [b - a for a, b in zip(before, counters(route, reason), strict=True)] == [1, 1]
        audits.append(audited(caplog))
    early, late = answers
    assert early.status == 401 and early.error()["code"] == "invalid_api_key", early.body
    assert early.header("www-authenticate") == "Bearer"
    assert early.header("x-request-id") == "same-id"
    assert early.header("connection") == "close"
    assert (late.status, late.body, late.headers) == (401, early.body, early.but_connection())
    assert len(audits[0]) == 1 and audits[0][0]["reason"] == reason
    assert without_key_id(audits[0]) == without_key_id(audits[1])


def test_any_other_v1_post_is_gated_too(gated):
    """A route added under /v1 later is covered without being listed."""
    early = post(gated, "/v1/embeddings", {}, None)
    assert early.status == 401 and early.header("connection") == "close"
    key = {"authorization": gated.headers["authorization"]}
    assert post(gated, "/v1/embeddings", key).status == 404


def test_a_valid_key_is_verified_once_and_served_as_before(gated, monkeypatch):
    authenticator = gated.app.state.authenticator
    authenticator.invalidate()  # a cold cache: the registry is asked
    calls = 0
    authenticate = authenticator.authenticate

    async def counted(presented: str, *, client: str | None) -> Any:
        nonlocal calls
        calls += 1
        return await authenticate(presented, client=client)

    monkeypatch.setattr(authenticator, "authenticate", counted)
    tenant = {"tenant": gated.tenant, "adapter": "", "version": ""}
    before = sample("loraplex_requests_total", **tenant, route="completions", status="200")
    served = post(gated, COMPLETIONS, {"authorization": gated.headers["authorization"]})
    assert served.status == 200, served.body
    assert json.loads(served.body)["choices"][0]["text"] == "a"
    assert calls == 1  # the route took the gate's principal rather than verifying again
    after = sample("loraplex_requests_total", **tenant, route="completions", status="200")
    assert after == before + 1  # counted against the tenant, as before


def test_a_streamed_chat_with_a_valid_key_still_streams(gated):
    with gated.stream("POST", CHAT, json={**CHAT_PROMPT, "stream": True}) as streamed:
        assert streamed.status_code == 200, streamed.read()
        lines = [line for line in streamed.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and '"content":"a"' in "".join(lines)


def test_without_the_gate_the_dependency_still_verifies_the_key(ungated):
    """Tests (and any app built without the gate) call the route directly."""
    served = post(ungated, COMPLETIONS, {"authorization": ungated.headers["authorization"]})
    assert served.status == 200, served.body
    assert post(ungated, COMPLETIONS, refused_headers(ungated, "wrong")).status == 401
    with pytest.raises(BodyRequested):  # the bug the gate removes, seen without it
        post(ungated, COMPLETIONS, refused_headers(ungated, "wrong"), None)


def test_models_are_listed_as_before(gated, ungated):
    """GET /v1/models has no body to spare: the gate leaves it to the dependency."""
    for client in (gated, ungated):
        assert client.get("/v1/models").status_code == 200
    headers = {"authorization": "Bearer nope", "x-request-id": "m"}
    early = gated.get("/v1/models", headers=headers)
    late = ungated.get("/v1/models", headers=headers)
    assert early.status_code == 401
    assert (early.content, early.headers.raw) == (late.content, late.headers.raw)


def test_a_registry_outage_gets_the_dependencys_answer(gated, ungated):
    """While the registry is down: a key never seen gets 503 registry_unavailable before its
    body, as the dependency answered after it; a key verified before keeps working."""
    answers: list[Answer] = []
    for client, payload in ((gated, None), (ungated, PROMPT)):
        key = {"authorization": client.headers["authorization"]}
        assert post(client, COMPLETIONS, key).status == 200  # cached now
        issued = client.post(f"/admin/v1/tenants/{client.tenant}/keys", headers=ADMIN)
        never_used = {"authorization": f"Bearer {issued.json()['key']}", "x-request-id": "down"}
        runtime = client.app.state.registry
        healthy = runtime.sessions
        runtime.sessions = failing = FailingSessions(healthy)
        failing.down = True
        try:
            time.sleep(TTL_S)  # the cached key is past its lifetime: only stale-if-error serves it
            answers.append(post(client, COMPLETIONS, never_used, payload))
            served = post(client, COMPLETIONS, key)
            assert served.status == 200, served.body
        finally:
            runtime.sessions = healthy
    early, late = answers
    assert early.status == 503 and early.error()["code"] == "registry_unavailable", early.body
    assert early.header("retry-after") == "5" and early.header("connection") == "close"
    assert (late.status, late.body, late.headers) == (503, early.body, early.but_connection())


class BrokenSessions:
    """A registry that refuses the statement (no outage): its error is nobody's typed answer."""

    def __call__(self) -> Any:
        raise DBAPIError("SELECT 1", None, Exception("some other refusal"))


def test_an_error_the_gate_cannot_answer_is_answered_by_the_app_as_before(gated, ungated):
    """Left to the route, which verifies again and whose handlers answer: the same 500 with
    its request id as before, not one from outside the request-id and metrics middlewares."""
    answers: list[Answer] = []
    for client in (gated, ungated):
        runtime = client.app.state.registry
        healthy = runtime.sessions
        runtime.sessions = BrokenSessions()
        try:
            answers.append(post(client, COMPLETIONS, refused_headers(client, "wrong")))
        finally:
            runtime.sessions = healthy
    early, late = answers
    assert early.status == 500 and "request id same-id" in early.error()["message"], early.body
    assert (late.status, late.body, late.headers) == (500, early.body, early.headers)


@pytest.mark.parametrize("root_path", ["/api", "/v1"])
def test_below_a_root_path_v1_is_gated_and_nothing_else(gated, root_path):
    """Behind a proxy's prefix (uvicorn --root-path) the router matches the path below it, and
    so does the gate: /api/v1/... is gated, /v1/admin/... (root path /v1) is not."""
    early = post(gated, COMPLETIONS, {}, None, root_path=root_path)
    assert early.status == 401 and early.error()["code"] == "invalid_api_key"
    key = {"authorization": gated.headers["authorization"]}
    assert post(gated, COMPLETIONS, key, root_path=root_path).status == 200
    created = post(
        gated,
        "/admin/v1/tenants",
        ADMIN,
        {"name": f"r{root_path[1:]}{time.time_ns()}"},
        root_path=root_path,
    )
    assert created.status == 201, created.body
