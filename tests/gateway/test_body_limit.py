"""Bodies over their route's limit are refused before anything reads them whole: on the
declared Content-Length at once, and while counting a chunked one."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from gateway.app import create_app
from gateway.body_limit import MULTIPART_SLACK_BYTES, BodySizeLimit, limits_by_route
from gateway.settings import Settings
from tests.gateway.fake_engine import ADMIN_TOKEN, BASE, ScriptedEngine, client_for
from tests.gateway.rollout_helpers import FILES, build_demo_root

CHUNK = 64 * 1024


class Reader:
    """An app that reads the whole body, as a form parser would; `fails_as` answers a failed
    read itself, as FastAPI does (400 "error parsing the body")."""

    def __init__(self, fails_as: int | None = None):
        self.read = 0
        self.called = False
        self.fails_as = fails_as

    async def __call__(self, scope, receive, send):
        self.called = True
        try:
            while True:
                message = await receive()
                self.read += len(message.get("body", b""))
                if not message.get("more_body"):
                    break
        except Exception:
            if self.fails_as is None:
                raise
            await send({"type": "http.response.start", "status": self.fails_as, "headers": []})
            await send({"type": "http.response.body", "body": b"parse error"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def call(app, *, body_bytes: int, declared: bool, limit: int):
    chunks = [b"x" * CHUNK] * (body_bytes // CHUNK)
    sent_chunks = 0

    async def receive():
        nonlocal sent_chunks
        sent_chunks += 1
        chunk = chunks[sent_chunks - 1] if sent_chunks <= len(chunks) else b""
        return {"type": "http.request", "body": chunk, "more_body": sent_chunks < len(chunks)}

    messages = []

    async def send(message):
        messages.append(message)

    headers = [(b"content-length", str(body_bytes).encode())] if declared else []
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers}
    await BodySizeLimit(app, lambda s: limit)(scope, receive, send)
    status = next(m["status"] for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return status, body, sent_chunks


async def test_a_declared_length_over_the_limit_is_refused_unread():
    app = Reader()
    status, body, pulled = await call(app, body_bytes=40 * CHUNK, declared=True, limit=CHUNK)
    assert status == 413 and not app.called and pulled == 0
    assert json.loads(body)["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("fails_as", [None, 400])
async def test_a_chunked_body_is_cut_off_once_past_the_limit(fails_as):
    app = Reader(fails_as=fails_as)
    status, body, pulled = await call(app, body_bytes=40 * CHUNK, declared=False, limit=CHUNK)
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    assert pulled == 2  # the chunk that passed the limit, never the other 38


async def test_bodies_within_the_limit_pass():
    for declared in (True, False):
        app = Reader()
        status, _, _ = await call(app, body_bytes=4 * CHUNK, declared=declared, limit=4 * CHUNK)
        assert status == 200 and app.read == 4 * CHUNK


def _scope(path: str, authorization: str | None = None) -> dict:
    headers = [] if authorization is None else [(b"authorization", authorization.encode())]
    return {"type": "http", "method": "POST", "path": path, "headers": headers}


def test_only_the_admins_upload_gets_the_upload_limit():
    limit_for = limits_by_route(
        upload_max_bytes=10_000, max_request_bytes=500, admin_token=SecretStr(ADMIN_TOKEN)
    )
    admin = f"Bearer {ADMIN_TOKEN}"
    assert limit_for(_scope("/admin/v1/adapters", admin)) == 10_000 + MULTIPART_SLACK_BYTES
    assert limit_for(_scope("/admin/v1/adapters/import", admin)) == 500
    assert limit_for(_scope("/v1/chat/completions", admin)) == 500
    for anonymous in (None, "Bearer", f"Bearer {ADMIN_TOKEN}x", f"Basic {ADMIN_TOKEN}"):
        assert limit_for(_scope("/admin/v1/adapters", anonymous)) == 500, anonymous
    disabled = limits_by_route(upload_max_bytes=10_000, max_request_bytes=500, admin_token=None)
    assert disabled(_scope("/admin/v1/adapters", admin)) == 500


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return build_demo_root(tmp_path_factory.mktemp("body-limit"))


def test_through_the_app(demo_root):
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with client_for(
        demo_root, ScriptedEngine(["a"]), max_request_bytes=4096, upload_max_bytes=1000
    ) as client:
        big_prompt = {"model": "loraplex-demo-base", "prompt": "x" * 5000, "max_tokens": 1}
        refused = client.post("/v1/completions", json=big_prompt)
        assert refused.status_code == 413
        assert refused.json()["error"]["code"] == "request_too_large"
        small = {"model": "loraplex-demo-base", "prompt": "x", "max_tokens": 1}
        assert client.post("/v1/completions", json=small).status_code == 200
        files = [("files", ("a.tar", b"\0" * (2 * MULTIPART_SLACK_BYTES)))]
        upload = client.post("/admin/v1/adapters", data={"name": "big"}, files=files, headers=admin)
        assert upload.status_code == 413


# --- over ASGI, as uvicorn drives the app: a chunked body the app pulls chunk by chunk -------

MiB = 1024 * 1024
BOUNDARY = "loraplex-test-boundary"


@dataclass
class Exchange:
    status: int
    headers: dict[str, str]
    body: bytes
    pulled: int  # body bytes the app asked the server for

    def error(self) -> dict[str, Any]:
        return json.loads(self.body)["error"]


async def stream_to(
    app: Any, path: str, headers: dict[str, str], chunks: Iterator[bytes]
) -> Exchange:
    """POST `chunks` without a Content-Length (chunked), counting what the app pulls."""
    answered = asyncio.Event()
    pulled = 0
    ended = False
    start: dict[str, Any] = {}
    body = b""

    async def receive() -> dict[str, Any]:
        nonlocal pulled, ended
        if ended:  # the client waits for its answer, then hangs up
            await answered.wait()
            return {"type": "http.disconnect"}
        chunk = next(chunks, None)
        if chunk is None:
            ended = True
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        nonlocal body
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            body += message.get("body", b"")
            if not message.get("more_body"):
                answered.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 80),
    }
    await app(scope, receive, send)
    sent = {k.decode(): v.decode() for k, v in start["headers"]}
    return Exchange(start["status"], sent, body, pulled)


def multipart(fields: dict[str, str], files: list[tuple[str, Iterator[bytes]]]) -> Iterator[bytes]:
    for name, value in fields.items():
        yield (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        ).encode()
    for filename, content in files:
        yield (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        yield from content
        yield b"\r\n"
    yield f"--{BOUNDARY}--\r\n".encode()


def zeros(total: int) -> Iterator[bytes]:
    for _ in range(total // CHUNK):
        yield b"\0" * CHUNK


UPLOAD_HEADERS = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


async def anonymous_upload(app: Any, authorization: str | None) -> Exchange:
    """100 MiB of a multipart upload, sent only as fast as the app pulls it."""
    headers = dict(UPLOAD_HEADERS)
    if authorization is not None:
        headers["authorization"] = authorization
    body = multipart({"name": "big", "tenant": "t"}, [("a.tar", zeros(100 * MiB))])
    return await stream_to(app, "/admin/v1/adapters", headers, body)


@pytest.mark.parametrize("authorization", [None, "Bearer not-the-admin-token", "Basic x"])
def test_an_anonymous_upload_is_refused_before_its_body_is_read(demo_root, caplog, authorization):
    """Everyone had the 2 GiB upload limit, and FastAPI reads (spools) the whole multipart body
    before `require_admin` runs: an anonymous caller made the gateway take 100 MiB."""
    with (
        client_for(demo_root, ScriptedEngine(["a"]), data_dir=demo_root / "anon") as client,
        caplog.at_level(logging.INFO, logger="loraplex.audit"),
    ):
        refused = client.portal.call(anonymous_upload, client.app, authorization)
    assert refused.status == 401 and refused.pulled < MiB, refused
    assert refused.error() == {
        "message": "Missing or invalid admin token.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_admin_token",
    }
    assert refused.headers["www-authenticate"] == "Bearer"
    assert refused.headers["x-request-id"]
    audits = [getattr(r, "audit", {}) for r in caplog.records]
    failures = [a for a in audits if a.get("event") == "auth.failure"]
    expected = {"reason": "admin", "path": "/admin/v1/adapters", "client": "127.0.0.1"}
    assert failures == [{"event": "auth.failure", **expected}]  # once, as before: not twice


def test_with_the_admin_api_disabled_an_upload_is_refused_unread(demo_root):
    settings = Settings(
        base_model=demo_root / "base",
        served_model_name=BASE,
        adapter_dir=None,
        data_dir=demo_root / "disabled",
    )
    assert settings.admin_token is None
    with TestClient(create_app(settings, engine=ScriptedEngine(["a"]))) as client:
        for authorization in (None, f"Bearer {ADMIN_TOKEN}"):
            refused = client.portal.call(anonymous_upload, client.app, authorization)
            assert refused.status == 403 and refused.pulled < MiB, refused
            assert refused.error()["code"] == "admin_api_disabled"
            assert refused.error()["type"] == "permission_error"


def test_the_admins_chunked_upload_still_gets_the_upload_limit(demo_root):
    """Both adapter files together are larger than every other route's limit."""
    files = [(f, iter([(demo_root / "v1" / f).read_bytes()])) for f in FILES]
    assert sum(len((demo_root / "v1" / f).read_bytes()) for f in FILES) > 4096
    with client_for(
        demo_root, ScriptedEngine(["a"]), data_dir=demo_root / "admin", max_request_bytes=4096
    ) as client:
        headers = {**UPLOAD_HEADERS, "authorization": f"Bearer {ADMIN_TOKEN}"}
        body = multipart({"name": "chunked", "tenant": client.tenant}, files)
        created = client.portal.call(stream_to, client.app, "/admin/v1/adapters", headers, body)
        assert created.status == 201, created.body
        assert json.loads(created.body)["version"] == 1


def test_a_413_carries_the_request_id(demo_root):
    """BodySizeLimit ran outside the request-id middleware: its 413s had no X-Request-Id."""
    with client_for(
        demo_root, ScriptedEngine(["a"]), data_dir=demo_root / "rid", max_request_bytes=4096
    ) as client:
        prompt = {"model": BASE, "prompt": "x" * 5000, "max_tokens": 1}
        declared = client.post("/v1/completions", json=prompt, headers={"X-Request-Id": "decl-1"})
        assert declared.status_code == 413
        assert declared.headers["x-request-id"] == "decl-1"
        assert client.post("/v1/completions", json=prompt).headers["x-request-id"]
        raw = json.dumps(prompt).encode()
        headers = {
            "content-type": "application/json",
            "authorization": client.headers["authorization"],
            "x-request-id": "chunked-1",
        }
        pieces = iter([raw[i : i + 1024] for i in range(0, len(raw), 1024)])
        chunked = client.portal.call(stream_to, client.app, "/v1/completions", headers, pieces)
        assert chunked.status == 413 and chunked.error()["code"] == "request_too_large"
        assert chunked.headers["x-request-id"] == "chunked-1"
