"""`make serve` runs `loraplex serve --demo`: from an empty data dir it builds the demo world,
serves it, prints the URL and a ready-to-paste call, and adapters answer unlike the base."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import BASE_NAME, start_gateway, stop_gateway

pytestmark = pytest.mark.engine
DEMO_KEY = "demo-key-chosen-by-the-operator-0123456789"


def test_demo_mode_from_an_empty_data_dir(tmp_path):
    gateway = start_gateway(None, tmp_path, "--demo", LORAPLEX_DEMO_API_KEY=DEMO_KEY)
    gateway.api_key = DEMO_KEY
    try:
        client = openai.OpenAI(
            base_url=gateway.v1, api_key=gateway.api_key, max_retries=0, timeout=60
        )
        models = [m.id for m in client.models.list().data]
        assert models[0] == BASE_NAME and len(models) >= 4

        def reply(model: str) -> str:
            response = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "Hello!"}],
                max_tokens=16,
                temperature=0,
            )
            return response.choices[0].message.content or ""

        base = reply(BASE_NAME)
        assert all(reply(name) != base for name in models[1:])
        log = gateway.log_path.read_text(errors="replace")
        assert f"loraplex is serving at {gateway.base_url}/v1" in log
        assert "curl -s" in log and "demo-qkvo-r8" in log
        assert f"API key: {DEMO_KEY}" in log and "Authorization: Bearer" in log
        assert (tmp_path / "data" / "demo" / "base" / "model.safetensors").exists()
    finally:
        stop_gateway(gateway)
