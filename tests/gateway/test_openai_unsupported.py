"""Features loraplex does not honour yet are refused with a 400 naming the field, never
silently ignored: a client that asked for a required tool call got a 200 with plain text.
Plain text stays served. (Structured outputs are served: test_openai_structured.py.)"""

from __future__ import annotations

import pytest

from tests.gateway.fake_engine import (
    BASE,
    ScriptedEngine,
    built_demo_root,
    openai_context,
)

CHAT = [{"role": "user", "content": "hi"}]
CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return built_demo_root(tmp_path_factory, "unsupported")


@pytest.fixture(scope="module")
def ctx(demo_root):
    with openai_context(demo_root, ScriptedEngine(["a", "b", "c"] * 10)) as made:
        yield made


def refused_with(response, param: str) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert "loraplex does not support" in error["message"]
    return error


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"function_call": {"name": "f"}}, "function_call"),
    ],
)
def test_a_chat_feature_loraplex_cannot_honour_is_refused_not_ignored(ctx, extra, param):
    client, _, engine = ctx
    before = len(engine.calls)
    response = client.post(
        "/v1/chat/completions", json={"model": BASE, "messages": CHAT, "max_tokens": 2, **extra}
    )
    refused_with(response, param)  # was a 200 with plain text
    assert len(engine.calls) == before


@pytest.mark.parametrize(
    "extra",
    [
        {"response_format": {"type": "text"}},
        {"response_format": None, "tools": None, "tool_choice": None},
        {"tools": [], "tool_choice": "none"},
        {"tool_choice": "auto"},
        {"parallel_tool_calls": False},
    ],
)
def test_asking_for_plain_text_or_no_tool_call_is_served(ctx, extra):
    client, _, _ = ctx
    response = client.post(
        "/v1/chat/completions", json={"model": BASE, "messages": CHAT, "max_tokens": 2, **extra}
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "ab"


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        (
            [
                *CHAT,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [CALL],
                },
            ],
            "messages.1.tool_calls",
        ),
        ([*CHAT, {"role": "tool", "tool_call_id": "c1", "content": "42"}], "messages.1.role"),
    ],
)
def test_a_tool_conversation_is_refused_rather_than_rendered_wrong(ctx, messages, param):
    client, _, engine = ctx
    before = len(engine.calls)
    response = client.post("/v1/chat/completions", json={"model": BASE, "messages": messages})
    refused_with(response, param)
    assert len(engine.calls) == before


def test_an_assistant_message_with_no_tool_calls_is_served(ctx):
    client, _, _ = ctx
    messages = [*CHAT, {"role": "assistant", "content": "yo", "tool_calls": []}, *CHAT]
    response = client.post("/v1/chat/completions", json={"model": BASE, "messages": messages})
    assert response.status_code == 200, response.text
