"""Bodies over their route's limit are refused before anything reads them whole: on the
declared Content-Length at once, and while counting a chunked one."""

from __future__ import annotations

import json

import pytest

from gateway.body_limit import MULTIPART_SLACK_BYTES, BodySizeLimit, limits_by_route
from tests.gateway.fake_engine import ADMIN_TOKEN, ScriptedEngine, client_for
from tests.gateway.rollout_helpers import build_demo_root

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


def test_only_the_upload_route_gets_the_upload_limit():
    limit_for = limits_by_route(upload_max_bytes=10_000, max_request_bytes=500)
    upload = {"method": "POST", "path": "/admin/v1/adapters"}
    assert limit_for(upload) == 10_000 + MULTIPART_SLACK_BYTES
    assert limit_for({"method": "POST", "path": "/admin/v1/adapters/import"}) == 500
    assert limit_for({"method": "POST", "path": "/v1/chat/completions"}) == 500


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
