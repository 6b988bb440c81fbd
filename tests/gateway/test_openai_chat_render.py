"""Chat messages reach the model's template as vLLM's server passes them: `developer` becomes
`system` for templates that do not know the role, text parts are joined by newlines, and a
message's `name` is passed through. What the engine gets is checked by decoding its prompt."""

from __future__ import annotations

from typing import Any

import pytest

from tests.gateway.fake_engine import BASE, ScriptedEngine, client_for

# Prints every field the gateway could pass, so that the prompt shows exactly what it passed.
SHOW_ALL = (
    "{% for m in messages %}[{{ m['role'] }}"
    "{% if m['name'] is defined %}|{{ m['name'] }}{% endif %}]{{ m['content'] }}\n"
    "{% endfor %}"
)
SHOW_ALL_WITH_DEVELOPER = (
    "{% for m in messages %}{% if m['role'] == 'developer' %}(dev){% endif %}"
    "[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
)


class PromptRecorder(ScriptedEngine):
    def __init__(self) -> None:
        super().__init__(["a"])
        self.prompts: list[list[int]] = []

    def generate(self, request_id: str, prompt_token_ids: list[int], *args: Any, **kw: Any):
        self.prompts.append(prompt_token_ids)
        return super().generate(request_id, prompt_token_ids, *args, **kw)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    from gateway.demo import build_base

    root = tmp_path_factory.mktemp("render")
    build_base(root / "base")
    return root


@pytest.fixture(scope="module")
def rendered(demo_root):
    """POST messages under a chat template; returns the prompt text the engine got."""
    engine = PromptRecorder()
    with client_for(demo_root, engine) as client:
        tokenizer = client.app.state.generation._prompts._tokenizer

        def render(messages: list[dict[str, Any]], template: str = SHOW_ALL) -> str:
            tokenizer.chat_template = template
            response = client.post(
                "/v1/chat/completions", json={"model": BASE, "messages": messages}
            )
            assert response.status_code == 200, response.text
            return tokenizer.decode(engine.prompts[-1])

        yield render


def test_text_parts_are_joined_with_newlines(rendered):
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    assert rendered([{"role": "user", "content": parts}]) == "[user]Hello\nworld\n"


def test_a_messages_name_reaches_the_template(rendered):
    messages = [
        {"role": "user", "content": "hi", "name": "alice"},
        {"role": "user", "content": "x"},
    ]
    assert rendered(messages) == "[user|alice]hi\n[user]x\n"


def test_developer_is_system_for_a_template_without_the_role(rendered):
    messages = [
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": "Hello"},
    ]
    assert rendered(messages) == "[system]Answer in French.\n[user]Hello\n"


def test_system_and_developer_messages_merge_into_one_first_system_message(rendered):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "developer", "content": "Answer in French."},
    ]
    assert rendered(messages) == "[system]Be brief.\n\nAnswer in French.\n[user]Hello\n"


def test_a_template_that_knows_developer_gets_it_as_sent(rendered):
    messages = [{"role": "developer", "content": "d"}, {"role": "user", "content": "u"}]
    assert rendered(messages, SHOW_ALL_WITH_DEVELOPER) == "(dev)[developer]d\n[user]u\n"


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "developer", "content": "d"}, {"role": "user", "content": "u"}],
        [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u", "name": "bob"},
            {"role": "developer", "content": "d", "name": "ops"},
            {"role": "developer", "content": ""},
        ],
        [{"role": "user", "content": "u"}, {"role": "developer", "content": "d"}],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
    ],
)
def test_the_conversion_is_vllms_own(messages):
    """Against the functions vLLM's server runs (vllm/renderers/hf.py), on the same messages."""
    from vllm.renderers import hf

    from gateway.services.prompts import _developer_as_system

    ours = _developer_as_system([dict(m) for m in messages])
    theirs = hf._consolidate_system_messages(hf._convert_developer_to_system(messages))
    assert ours == theirs
    assert not hf._detect_developer_role_support(SHOW_ALL)
    assert hf._detect_developer_role_support(SHOW_ALL_WITH_DEVELOPER)
