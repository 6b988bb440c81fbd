"""Errors after a stream started (status already 200): an SSE error event, then [DONE], and for
a server error the request id that the log lines are filed under, as non-stream bodies have."""

from __future__ import annotations

import json
import logging

import pytest

from gateway.engine.client import EngineError, EngineRejected
from tests.gateway.fake_engine import BASE, ScriptedEngine, client_for

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    from gateway.demo import build_base

    root = tmp_path_factory.mktemp("stream-errors")
    build_base(root / "base")
    return root


def sse_events(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


def test_an_unexpected_exception_mid_stream_is_an_error_event_then_done(demo_root, caplog):
    engine = ScriptedEngine(["a", "b", "c", "d"], fail_after=2, error=RuntimeError("internals"))
    with client_for(demo_root, engine) as client:
        with caplog.at_level(logging.ERROR, logger="gateway.services.openai_format"):
            response = client.post(
                "/v1/chat/completions",
                json={"model": BASE, **CHAT, "max_tokens": 4, "stream": True},
                headers={"X-Request-Id": "req-77"},
            )
        released = client.app.state.generation._limiter.running(client.tenant) == 0
    assert response.status_code == 200
    events = sse_events(response.text)
    assert events[-1] == "[DONE]", "the stream ended without [DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error"
    assert "req-77" in error["message"] and "internals" not in error["message"]
    contents = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[1:-2]]
    assert contents == ["a", "b"]
    assert released and engine.aborted == [engine.calls[0][0]]
    # The traceback is in the log, under the request id the client was given.
    logged = [r for r in caplog.records if "req-77" in r.getMessage()]
    assert logged and logged[0].exc_info is not None


@pytest.mark.parametrize(
    ("error", "code", "names_request"),
    [(EngineError("boom"), "generation_failed", True), (EngineRejected("bad"), None, False)],
)
def test_a_typed_error_mid_stream_names_the_request_when_it_is_the_servers(
    demo_root, error, code, names_request
):
    engine = ScriptedEngine(["a", "b", "c"], fail_after=1, error=error)
    with client_for(demo_root, engine) as client:
        response = client.post(
            "/v1/completions",
            json={"model": BASE, "prompt": "x", "max_tokens": 3, "stream": True},
            headers={"X-Request-Id": "req-42"},
        )
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    body = json.loads(events[-2])["error"]
    assert body["code"] == code
    assert ("(request id req-42)" in body["message"]) is names_request
