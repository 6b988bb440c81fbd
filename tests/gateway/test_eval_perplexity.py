"""`loraplex eval perplexity`'s measure through the app: a dev set's prompts scored with echo and
logprobs, the first token of each and the generated one left out, pooled as prompt drift pools
them; a prompt the gateway refuses names itself; a dev set that cannot be read names its line.
Prompts longer than drift samples are measured and left out. The real engine's number is held
to HF transformers in tests/e2e/test_prompt_drift."""

from __future__ import annotations

import json
import math

import httpx
import pytest

from gateway.evals.perplexity import DevSetError, load_dev_set, measure
from tests.gateway.fake_engine import BASE, ScriptedEngine, built_demo_root, client_for


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return built_demo_root(tmp_path_factory, "perplexity")


async def _measure(app, key: str, prompts, concurrency: int = 2, max_prompt_tokens: int = 512):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://testserver", headers={"Authorization": key}
    ) as http:
        return await measure(http, BASE, prompts, concurrency, max_prompt_tokens)


def test_the_dev_sets_prompts_are_pooled_without_first_or_generated_tokens(demo_root):
    engine = ScriptedEngine(["a"])
    engine.scripted_logprobs = True  # the generated token's -0.5 must not count
    with client_for(demo_root, engine, echo_logprobs_max_prompt_tokens=8) as client:
        key = client.headers["Authorization"]
        measured = client.portal.call(_measure, client.app, key, [[1, 7, 8], [1, 9, 9, 9]])
        # Scripted: token i of a prompt has logprob -i/10 (the first none).
        assert (measured.prompts, measured.tokens) == (2, 5)
        assert measured.surprisal == pytest.approx(0.1 + 0.2 + 0.1 + 0.2 + 0.3)
        assert measured.value == pytest.approx(math.exp(0.9 / 5))
        assert {call[2].echo_logprobs for call in engine.calls} == {0}
        # Prompts longer than drift samples are left out, counted.
        short = client.portal.call(_measure, client.app, key, [[1, 7, 8], [1, 9, 9, 9]], 2, 3)
        assert (short.prompts, short.skipped, short.tokens) == (1, 1, 2)
        refused = r"prompt 2: refused \(400\).*at most 8 prompt tokens"
        with pytest.raises(DevSetError, match=refused):
            client.portal.call(_measure, client.app, key, [[1, 2], list(range(1, 12))], 1)


def test_a_dev_set_that_cannot_be_read_names_its_line(tmp_path):
    path = tmp_path / "dev.jsonl"
    path.write_text(
        "\n".join(json.dumps({"prompt": p}) for p in ("hello there", [1, 2, 3])) + "\n\n",
        encoding="utf-8",
    )
    assert load_dev_set(path) == ["hello there", [1, 2, 3]]
    for body, message in (
        ('{"text": "x"}', "2: not a JSON object with a `prompt`"),
        ('{"prompt": "  "}', "2: a prompt is non-empty text or token ids"),
        ('{"prompt": [1, true]}', "2: a prompt is non-empty text or token ids"),
        ("[1, 2]", "2: not a JSON object"),
    ):
        path.write_text('{"prompt": "ok"}\n' + body + "\n", encoding="utf-8")
        with pytest.raises(DevSetError, match=message):
            load_dev_set(path)
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(DevSetError, match="no prompts"):
        load_dev_set(path)
    with pytest.raises(DevSetError):
        load_dev_set(tmp_path / "missing.jsonl")
