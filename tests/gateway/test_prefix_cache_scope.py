"""Every request reaches the engine salted with its tenant (vLLM's cache_salt), so it reuses
cached prompt prefixes of its own tenant's requests only; `shared` turns the salt off."""

from __future__ import annotations

import pytest

from tests.gateway.fake_engine import ADMIN_TOKEN, ScriptedEngine, client_for
from tests.gateway.rollout_helpers import build_demo_root, register

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return build_demo_root(tmp_path_factory.mktemp("cache-salt"))


def ask(client, model: str, **body) -> int:
    payload = {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}
    return client.post("/v1/chat/completions", json={**payload, **body}).status_code


def test_each_request_is_salted_with_its_tenant(demo_root):
    engine = ScriptedEngine(["a", "b"])
    with client_for(demo_root, engine, data_dir=demo_root / "salted") as client:
        register(client, demo_root, "salted-bot", "v1")
        assert ask(client, "loraplex-demo-base") == 200
        assert ask(client, "salted-bot", stream=True) == 200
        assert ask(client, "salted-bot", n=2, temperature=0.5) == 200
        other = client.post("/admin/v1/tenants", json={"name": "other-tenant"}, headers=ADMIN)
        assert other.status_code == 201
        key = client.post("/admin/v1/tenants/other-tenant/keys", headers=ADMIN).json()["key"]
        mine = len(engine.calls)
        client.headers["Authorization"] = f"Bearer {key}"
        assert ask(client, "loraplex-demo-base") == 200
    salts = [options.cache_salt for _, _, options in engine.calls]
    assert salts[:mine] == [client.tenant] * mine and salts[mine:] == ["other-tenant"]


def test_shared_scope_sends_no_salt(demo_root):
    engine = ScriptedEngine(["a"])
    with client_for(
        demo_root, engine, data_dir=demo_root / "shared", prefix_cache_scope="shared"
    ) as client:
        assert ask(client, "loraplex-demo-base") == 200
    assert [options.cache_salt for _, _, options in engine.calls] == [None]


def test_usage_reports_the_prompt_tokens_served_from_the_cache(demo_root):
    import json

    engine = ScriptedEngine(["a", "b"])
    with client_for(demo_root, engine, data_dir=demo_root / "usage") as client:
        base = {"model": "loraplex-demo-base", "max_tokens": 2}
        chat = {**base, "messages": [{"role": "user", "content": "x"}]}

        def usage(path: str, body: dict) -> dict:
            response = client.post(path, json=body)
            assert response.status_code == 200, response.text
            if not body.get("stream"):
                return response.json()["usage"]
            events = [line[6:] for line in response.text.splitlines() if line[6:][:1] == "{"]
            return json.loads(events[-1])["usage"]

        assert "prompt_tokens_details" not in usage("/v1/chat/completions", chat)  # not said
        engine.cached_prompt_tokens = 3
        assert usage("/v1/chat/completions", chat)["prompt_tokens_details"] == {"cached_tokens": 3}
        streamed = {**chat, "stream": True, "stream_options": {"include_usage": True}}
        in_stream = usage("/v1/chat/completions", streamed)
        assert in_stream["prompt_tokens_details"]["cached_tokens"] == 3
        # greedy n=3 runs the prompt three times: it is counted once, like prompt_tokens
        fanned = usage("/v1/chat/completions", {**chat, "n": 3, "temperature": 0})
        assert fanned["prompt_tokens_details"]["cached_tokens"] == 3
        two_prompts = {**base, "prompt": ["x", "y"]}
        assert usage("/v1/completions", two_prompts)["prompt_tokens_details"]["cached_tokens"] == 6
    # 3 single requests, the n=3 one fanned out into three n=1 copies, two prompts
    assert [o.n for _, _, o in engine.calls] == [1] * 8
