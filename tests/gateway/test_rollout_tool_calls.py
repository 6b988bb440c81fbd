"""A canary whose tool calls (tool_choice "auto", scripted engine, vLLM's Hermes parser) are
invalid is rolled back after a full window of its owner's calls (reason tool_calls), and one
writing valid calls is not; calls from a tenant the adapter is shared with are counted, never
act."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from tests.gateway.fake_engine import ScriptedEngine, client_for
from tests.gateway.rollout_helpers import build_demo_root, wait_for
from tests.gateway.test_feedback import WINDOW, new_tenant, rollout, start_canary
from tests.gateway.test_openai_tools import CHAT, WEATHER

VALID = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
UNKNOWN = '<tool_call>{"name": "fly", "arguments": {}}</tool_call>'


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_root(tmp_path_factory.mktemp("tool-rollout"))


def engine_writing(text: str) -> ScriptedEngine:
    engine = ScriptedEngine([text[i : i + 8] for i in range(0, len(text), 8)])
    engine.finish_reason = "stop"
    engine.max_model_len = 2048  # tools are long prompts in the demo's small vocabulary
    return engine


def call_canary(client, engine, name: str, calls: int, headers=None) -> str:
    """Chat requests with tools from distinct sticky users until the canary served `calls`;
    the last user it served."""
    canary_engine_id = None
    served = 0
    for i in range(300):
        body = {
            "model": name,
            "messages": CHAT,
            "tools": [WEATHER],
            "max_tokens": 512,
            "user": f"u{i}",
        }
        response = client.post("/v1/chat/completions", json=body, headers=headers or {})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["tool_calls"]
        engine_id = engine.calls[-1][1].engine_id
        if canary_engine_id is None:
            pinned = {**body, "model": f"{name}@2"}
            assert client.post("/v1/chat/completions", json=pinned, headers=headers or {})
            canary_engine_id = engine.calls[-1][1].engine_id
        if engine_id == canary_engine_id:
            served += 1
            if served == calls:
                return body["user"]
    raise AssertionError("the canary served too few requests")


def test_a_canary_writing_invalid_calls_is_rolled_back_after_a_window(demo_root):
    engine = engine_writing(UNKNOWN)
    with client_for(demo_root, engine, tool_call_parser="hermes") as client:
        client.demo_root = demo_root
        start_canary(client, "tc-bad")
        call_canary(client, engine, "tc-bad", WINDOW - 1)
        assert rollout(client, "tc-bad")["canary_version"] == 2  # the window is not full
        call_canary(client, engine, "tc-bad", 1)
        assert wait_for(lambda: rollout(client, "tc-bad")["canary_version"] is None)
        event = rollout(client, "tc-bad")["events"][0]
        assert event["action"] == "rollback" and "valid tool calls" in event["reason"]
        assert event["figures"] == {"tool_calls": WINDOW, "tool_call_validity": 0.0}
        labels = {"adapter": "tc-bad", "version": "2", "reason": "tool_calls"}
        assert REGISTRY.get_sample_value("loraplex_rollbacks_total", labels) == 1


def test_a_canary_writing_valid_calls_stays(demo_root):
    engine = engine_writing(VALID)
    with client_for(demo_root, engine, tool_call_parser="hermes") as client:
        client.demo_root = demo_root
        start_canary(client, "tc-good")
        call_canary(client, engine, "tc-good", 2 * WINDOW)
        assert not wait_for(lambda: rollout(client, "tc-good")["canary_version"] is None, 0.3)


def test_a_consumers_invalid_calls_are_counted_but_never_roll_the_canary_back(demo_root):
    engine = engine_writing(UNKNOWN)
    with client_for(demo_root, engine, tool_call_parser="hermes") as client:
        client.demo_root = demo_root
        start_canary(client, "tc-shared", visibility="shared")
        consumer = new_tenant(client)
        headers = {"Authorization": consumer["Authorization"]}
        call_canary(client, engine, "tc-shared", 2 * WINDOW, headers=headers)
        labels = {
            "tenant": consumer["name"],
            "adapter": "tc-shared",
            "version": "2",
            "outcome": "unknown_function",
        }
        counted = REGISTRY.get_sample_value("loraplex_tool_calls_total", labels)
        assert counted == 2 * WINDOW + 1  # and the pinned name@2 request that found the canary
        assert not wait_for(lambda: rollout(client, "tc-shared")["canary_version"] is None, 0.5)


def test_one_response_is_one_piece_of_evidence_however_many_calls_or_copies(demo_root):
    """A greedy n=WINDOW request (fanned out into WINDOW engine requests) or one output with
    WINDOW bad calls (an end user's prompt injection through the owner's app) filled a whole
    window and rolled the canary back (found by review)."""
    engine = engine_writing(UNKNOWN * WINDOW)
    with client_for(demo_root, engine, tool_call_parser="hermes") as client:
        client.demo_root = demo_root
        start_canary(client, "tc-one")
        user = call_canary(client, engine, "tc-one", 1)
        greedy = {
            "model": "tc-one",
            "messages": CHAT,
            "tools": [WEATHER],
            "max_tokens": 512,
            "n": WINDOW,
            "temperature": 0,
            "user": user,  # sticky: the canary again
        }
        assert client.post("/v1/chat/completions", json=greedy).status_code == 200
        assert len(engine.calls[-1][2].stop) == 0 and engine.calls[-1][2].n == 1  # fanned out
        labels = {"tenant": client.tenant, "adapter": "tc-one", "version": "2"}
        counted = REGISTRY.get_sample_value(
            "loraplex_tool_calls_total", {**labels, "outcome": "unknown_function"}
        )
        # Per distinct output, its WINDOW calls: the first routed request's, the pinned one
        # that found the canary, and the greedy n=WINDOW one's, once.
        assert counted == 3 * WINDOW
        # Two routed responses: two pieces of evidence, not a full window.
        assert not wait_for(lambda: rollout(client, "tc-one")["canary_version"] is None, 0.3)
