"""Sampling as vLLM's own server does it: the model's generation defaults (generation_config.json,
through vLLM's get_diff_sampling_param) where the client sent nothing, and vLLM's extension
fields (top_k, min_p, repetition_penalty, min_tokens, stop_token_ids), bounded as vLLM bounds
them, on both routes."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.engine.client import SamplingOptions
from tests.gateway.fake_engine import (
    BASE,
    ScriptedEngine,
    built_demo_root,
    client_for,
    openai_context,
)

CHAT = [{"role": "user", "content": "hi"}]
VOCAB = 695  # the demo tokenizer's size (<think> and </think> included)


class ModelDefaultsEngine(ScriptedEngine):
    """An engine whose model ships generation defaults, as vLLM reports them (Qwen2.5-Instruct's
    generation_config.json, plus a max_new_tokens, which vLLM renames max_tokens)."""

    def __init__(self, defaults: dict[str, Any] | None = None):
        super().__init__(["a"] * 30)
        self.defaults = defaults or {
            "repetition_penalty": 1.05,
            "temperature": 0.7,
            "top_k": 20,
            "top_p": 0.8,
            "min_p": 0.05,
            "max_tokens": 7,
        }

    def default_sampling(self) -> dict[str, Any]:
        return dict(self.defaults)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return built_demo_root(tmp_path_factory, "sampling")


@pytest.fixture(scope="module")
def ctx(demo_root):
    with openai_context(demo_root, ScriptedEngine(["a", "b", "c"] * 10)) as made:
        yield made


def last_options(engine: ScriptedEngine) -> SamplingOptions:
    return engine.calls[-1][2]


EXTENSIONS = {"top_k": 1, "min_p": 0.5, "repetition_penalty": 1.3, "min_tokens": 2}


def test_the_vllm_extension_fields_reach_the_engine_on_both_routes(ctx):
    _, sdk, engine = ctx
    extra = {**EXTENSIONS, "stop_token_ids": [5, 9]}
    sdk.chat.completions.create(model=BASE, messages=CHAT, max_tokens=3, extra_body=extra)
    chat = last_options(engine)
    sdk.completions.create(model=BASE, prompt="x", max_tokens=3, extra_body=extra)
    completion = last_options(engine)
    for options in (chat, completion):
        assert (options.top_k, options.min_p, options.repetition_penalty) == (1, 0.5, 1.3)
        assert options.min_tokens == 2 and options.stop_token_ids == (5, 9)


def test_left_out_they_are_the_engines_defaults(ctx):
    _, sdk, engine = ctx
    sdk.chat.completions.create(model=BASE, messages=CHAT, max_tokens=3)
    options = last_options(engine)
    assert options.top_k is None and options.min_p is None and options.repetition_penalty is None
    assert options.min_tokens == 0 and options.stop_token_ids == ()


def test_the_models_generation_defaults_apply_where_the_client_sent_none(demo_root):
    engine = ModelDefaultsEngine()
    with client_for(demo_root, engine) as client:
        client.post("/v1/chat/completions", json={"model": BASE, "messages": CHAT})
        options = last_options(engine)
        # top_k, min_p and repetition_penalty were dropped, and max_tokens was the whole room.
        assert (options.temperature, options.top_p, options.top_k) == (0.7, 0.8, 20)
        assert (options.min_p, options.repetition_penalty) == (0.05, 1.05)
        assert options.max_tokens == 7
        mine = {"temperature": 0.2, "top_p": 0.5, "max_tokens": 9, **EXTENSIONS}
        client.post("/v1/chat/completions", json={"model": BASE, "messages": CHAT, **mine})
        options = last_options(engine)
        assert (options.temperature, options.top_p, options.top_k) == (0.2, 0.5, 1)
        assert (options.min_p, options.repetition_penalty, options.max_tokens) == (0.5, 1.3, 9)
        # Completions keep OpenAI's default of 16 when left out, as vLLM's server does.
        client.post("/v1/completions", json={"model": BASE, "prompt": "x"})
        options = last_options(engine)
        assert options.max_tokens == 16 and options.top_k == 20


def test_the_models_default_max_tokens_stays_within_the_room(demo_root):
    engine = ModelDefaultsEngine({"max_tokens": 10_000})
    with client_for(demo_root, engine) as client:
        response = client.post("/v1/chat/completions", json={"model": BASE, "messages": CHAT})
    assert response.status_code == 200, response.text
    prompt_tokens = response.json()["usage"]["prompt_tokens"]
    assert last_options(engine).max_tokens == engine.max_model_len - prompt_tokens


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"top_k": 2**64}, "top_k"),  # msgpack to the engine core takes int64 at most
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.01}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 4, "max_tokens": 3}, "min_tokens"),
        ({"min_tokens": 300}, "min_tokens"),  # above the room the context leaves
        ({"stop_token_ids": [VOCAB]}, "stop_token_ids"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": [True]}, "stop_token_ids.0"),
        ({"stop_token_ids": "5"}, "stop_token_ids"),
    ],
)
@pytest.mark.parametrize("route", ["chat", "completions"])
def test_an_out_of_range_extension_value_is_a_400_naming_it(ctx, extra, param, route):
    client, _, engine = ctx
    before = len(engine.calls)
    if route == "chat":
        path, body = "/v1/chat/completions", {"messages": CHAT}
    else:
        path, body = "/v1/completions", {"prompt": "x"}
    response = client.post(path, json={"model": BASE, **body, **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert len(engine.calls) == before


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_a_non_finite_repetition_penalty_is_a_400(ctx, value):
    client, _, _ = ctx
    raw = f'{{"model":"{BASE}","prompt":"x","repetition_penalty":{value}}}'
    response = client.post(
        "/v1/completions", content=raw.encode(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "repetition_penalty"


@pytest.mark.parametrize(
    "extra",
    [
        {"top_k": 0},
        {"top_k": -1},  # vLLM takes -1 for "no top-k" too
        {"min_p": 0.0},
        {"min_p": 1.0},
        {"min_tokens": 3, "max_tokens": 3},
        {"stop_token_ids": [0, VOCAB - 1]},
        {"stop_token_ids": []},
    ],
)
def test_extension_values_at_vllms_bounds_are_served(ctx, extra):
    client, _, _ = ctx
    response = client.post(
        "/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 3, **extra}
    )
    assert response.status_code == 200, response.text
