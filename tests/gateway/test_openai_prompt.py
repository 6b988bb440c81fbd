"""Building the prompt: chat templates that refuse a conversation, and tokenization that must
not hold up every other request while it runs."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.gateway.fake_engine import BASE, ScriptedEngine, asgi_post, client_for

# Gemma's template refuses a system message; Llama-2's and Mistral's refuse roles that do not
# alternate. Both raise jinja2's TemplateError through raise_exception.
NO_SYSTEM_ROLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ message['role'] }}\n{{ message['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
BIG = "lorem ipsum dolor sit amet " * 100_000  # 2.7 MB


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    from gateway.demo import build_base

    root = tmp_path_factory.mktemp("prompt")
    build_base(root / "base")
    return root


def test_a_chat_template_refusing_the_conversation_is_the_clients_400(demo_root):
    engine = ScriptedEngine(["a"])
    with client_for(demo_root, engine) as client:
        client.app.state.generation._prompts._tokenizer.chat_template = NO_SYSTEM_ROLE
        user_only = [{"role": "user", "content": "hi"}]
        assert (
            client.post(
                "/v1/chat/completions", json={"model": BASE, "messages": user_only}
            ).status_code
            == 200
        )
        response = client.post(
            "/v1/chat/completions",
            json={
                "model": BASE,
                "messages": [{"role": "system", "content": "be brief"}, *user_only],
                "stream": True,
            },
        )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "messages"
    assert "System role not supported" in error["message"]
    assert len(engine.calls) == 1


def test_a_broken_chat_template_is_the_servers_500(demo_root):
    engine = ScriptedEngine(["a"])
    with client_for(demo_root, engine) as client:
        broken = "{% for m in messages %}{{ m }"
        client.app.state.generation._prompts._tokenizer.chat_template = broken
        response = client.post(
            "/v1/chat/completions",
            json={"model": BASE, "messages": [{"role": "user", "content": "hi"}]},
            headers={"X-Request-Id": "req-tpl"},
        )
    assert response.status_code == 500 and "req-tpl" in response.json()["error"]["message"]


class LoopWatch:
    """The longest the event loop went without running a 10 ms ticker."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.worst = max(self.worst, now - last)
            last = now

    async def __aenter__(self) -> LoopWatch:
        self._task = asyncio.ensure_future(self._tick())
        await asyncio.sleep(0.05)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.sleep(0.05)
        assert self._task is not None
        self._task.cancel()


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": BIG}, "prompt"),
        ("/v1/completions", {"prompt": ["x", BIG]}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": BIG}]}, "messages"),
    ],
)
def test_a_prompt_far_beyond_the_context_is_refused_without_tokenizing_it(
    demo_root, path, body, param
):
    engine = ScriptedEngine(["a"])
    with client_for(demo_root, engine) as client:
        headers = dict(client.headers)

        async def scenario():
            async with LoopWatch() as watch:
                result = await asgi_post(client.app, path, {"model": BASE, **body}, headers)
            return result, watch.worst

        result, worst = client.portal.call(scenario)
    assert result.status == 400
    assert b'"code":"context_length_exceeded"' in result.body
    assert f'"param":"{param}"'.encode() in result.body
    assert worst < 0.25, f"the event loop stalled {worst:.2f} s on one request's prompt"
    assert engine.calls == []


class SlowTokenizer:
    """The app's tokenizer, taking `seconds` per encode and per template, as a long prompt's
    do (a 2.7 MB one took 2.4 s); sleeping, like the Rust tokenizer, without the GIL."""

    def __init__(self, inner: Any, seconds: float):
        self._inner = inner
        self._seconds = seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __len__(self) -> int:
        return len(self._inner)

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(self._seconds)
        return self._inner.encode(*args, **kwargs)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(self._seconds)
        return self._inner.apply_chat_template(*args, **kwargs)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "a long prompt"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a long prompt"}]}),
    ],
)
def test_tokenizing_a_prompt_does_not_stall_other_streams(demo_root, path, body):
    engine = ScriptedEngine([f"w{i} " for i in range(20)], delay=0.01)
    with client_for(demo_root, engine) as client:
        service = client.app.state.generation
        service._prompts._tokenizer = SlowTokenizer(service._prompts._tokenizer, seconds=0.4)
        headers = dict(client.headers)
        request = {"model": BASE, **body, "max_tokens": 2}

        async def scenario():
            async with LoopWatch() as watch:
                result = await asgi_post(client.app, path, request, headers)
            return result, watch.worst

        result, worst = client.portal.call(scenario)
    assert result.status == 200, result.body[:200]
    assert worst < 0.2, f"the event loop stalled {worst:.2f} s while a prompt was tokenized"
