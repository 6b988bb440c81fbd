"""Failure paths that the real engine cannot be made to produce on demand (fake engine)."""

from __future__ import annotations

import json

import pytest

from gateway.engine.client import EngineDead, EngineError, EngineRejected
from tests.gateway.fake_engine import BASE, ScriptedEngine, client_for


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    from gateway.demo import build_base

    root = tmp_path_factory.mktemp("fake")
    build_base(root / "base")
    return root


def sse_events(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


def test_error_after_stream_started_becomes_error_event_then_done(demo_root):
    engine = ScriptedEngine(["a", "b", "c", "d"], fail_after=2, error=EngineError("boom"))
    with client_for(demo_root, engine) as client:
        response = client.post(
            "/v1/completions",
            json={"model": BASE, "prompt": "x", "max_tokens": 4, "stream": True},
        )
    assert response.status_code == 200
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and error["code"] == "generation_failed"
    texts = [json.loads(e)["choices"][0]["text"] for e in events[:-2]]
    assert texts == ["a", "b"]
    assert engine.aborted == [engine.calls[0][0]]  # the failed request was aborted


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (EngineDead("gone"), 503, "engine_unavailable"),
        (EngineRejected("bad sampling"), 400, None),
        (EngineError("boom"), 500, "generation_failed"),
    ],
)
def test_engine_failures_map_to_openai_errors(demo_root, error, status, code):
    engine = ScriptedEngine(["a", "b"], fail_after=0, error=error)
    with client_for(demo_root, engine) as client:
        response = client.post(
            "/v1/chat/completions",
            json={"model": BASE, "messages": [{"role": "user", "content": "hi"}]},
            headers={"X-Request-Id": "req-42"},
        )
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code
    if status >= 500:
        assert "req-42" in body["error"]["message"]
    if status == 503:
        assert response.headers["retry-after"]


def test_failure_before_first_token_gets_a_real_status_not_a_broken_stream(demo_root):
    engine = ScriptedEngine(["a"], fail_after=0, error=EngineRejected("n must be 1"))
    with client_for(demo_root, engine) as client:
        response = client.post(
            "/v1/chat/completions",
            json={"model": BASE, "messages": [{"role": "user", "content": "hi"}], "stream": True},
        )
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "n must be 1"


def test_unexpected_exception_is_a_500_with_request_id_and_no_traceback(demo_root):
    engine = ScriptedEngine(["a"], fail_after=0, error=RuntimeError("secret internals"))
    with client_for(demo_root, engine) as client:
        response = client.post(
            "/v1/completions",
            json={"model": BASE, "prompt": "x"},
            headers={"X-Request-Id": "req-7"},
        )
    assert response.status_code == 500
    message = response.json()["error"]["message"]
    assert "req-7" in message and "secret internals" not in message


def test_n_and_multiple_prompts_index_choices_in_order(demo_root):
    engine = ScriptedEngine(["a", "b"])
    with client_for(demo_root, engine) as client:
        response = client.post(
            "/v1/completions",
            json={"model": BASE, "prompt": ["x", "y"], "n": 2, "max_tokens": 2},
        )
    body = response.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["text"] == "ab" for c in body["choices"])
    assert body["usage"]["completion_tokens"] == 8
