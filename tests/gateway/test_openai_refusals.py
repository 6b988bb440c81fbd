"""What the gateway refuses, and how it names the field at fault: input the tokenizer or the
engine cannot take (was a 500), and the `param` of every refusal as OpenAI's clients read it
(see test_openai_unsupported for the features loraplex does not honour yet)."""

from __future__ import annotations

import pytest

from gateway.engine.client import EngineRejected
from tests.gateway.fake_engine import (
    ADMIN_TOKEN,
    BASE,
    ScriptedEngine,
    built_demo_root,
    client_for,
    openai_context,
)

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return built_demo_root(tmp_path_factory, "refusals")


@pytest.fixture(scope="module")
def ctx(demo_root):
    with openai_context(demo_root, ScriptedEngine(["a", "b", "c"] * 10)) as made:
        yield made


def post_raw(client, path: str, raw: str):
    """JSON the openai client (and json.dumps) cannot write: lone surrogates, broken JSON."""
    return client.post(path, content=raw.encode(), headers={"content-type": "application/json"})


def refused_with(response, param: str | None) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    return error


# ---- logit_bias keys past Python's int-string limit ----------------------------------------------
@pytest.mark.parametrize("key", ["1" * 5000, "9" * 4400, "0" * 4300 + "1" * 4301])
def test_a_logit_bias_key_of_thousands_of_digits_is_a_400(ctx, key):
    client, _, engine = ctx
    before = len(engine.calls)
    for path, body in [
        ("/v1/chat/completions", {"messages": CHAT}),
        ("/v1/completions", {"prompt": "x"}),
    ]:
        response = client.post(
            path, json={"model": BASE, **body, "max_tokens": 1, "logit_bias": {key: 1}}
        )
        error = refused_with(response, "logit_bias")  # was a 500: int() refused the key
        assert len(error["message"]) < 200  # the key is not echoed whole
    assert len(engine.calls) == before


def test_zero_padded_logit_bias_keys_still_work(ctx):
    """int() reads leading zeros; the digit bound counts the rest (it refused "00001")."""
    _, sdk, engine = ctx
    sdk.completions.create(model=BASE, prompt="x", max_tokens=1, logit_bias={"005": 1})
    assert engine.calls[-1][2].logit_bias == ((5, 1.0),)
    padded = {"0" * 5000 + "7": 2, "00001": 1}
    sdk.completions.create(model=BASE, prompt="x", max_tokens=1, logit_bias=padded)
    assert engine.calls[-1][2].logit_bias == ((7, 2.0), (1, 1.0))


# ---- lone UTF-16 surrogates ---------------------------------------------------------------------
CHAT_WITH = '{"model":"%s","max_tokens":2,"messages":%s%s}'
DONE_WITH = '{"model":"%s","max_tokens":2,"prompt":%s%s}'


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        ("/v1/completions", DONE_WITH % (BASE, '"hi \\ud800 there"', ""), "prompt"),
        ("/v1/completions", DONE_WITH % (BASE, '["ok", "\\udfff"]', ""), "prompt"),
        (
            "/v1/chat/completions",
            CHAT_WITH % (BASE, '[{"role":"user","content":"\\ud83d"}]', ""),
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            CHAT_WITH
            % (
                BASE,
                '[{"role":"system","content":"s"},{"role":"user","content":'
                '[{"type":"text","text":"ok"},{"type":"text","text":"\\udc00"}]}]',
                "",
            ),
            "messages.1.content",
        ),
        (
            "/v1/chat/completions",
            CHAT_WITH % (BASE, '[{"role":"user","content":"x","name":"\\ud800"}]', ""),
            "messages.0.name",
        ),
        ("/v1/completions", DONE_WITH % (BASE, '"hi"', ',"stop":["ok","\\ud800"]'), "stop"),
        (
            "/v1/chat/completions",
            CHAT_WITH
            % (BASE, '[{"role":"user","content":"hi"}]', ',"stream":true,"stop":"\\ud800"'),
            "stop",
        ),
    ],
)
def test_an_unpaired_surrogate_is_refused_naming_its_field(ctx, path, raw, param):
    client, _, engine = ctx
    before = len(engine.calls)
    error = refused_with(post_raw(client, path, raw), param)  # was a 500 from the tokenizer
    assert "surrogate" in error["message"]
    assert len(engine.calls) == before


def test_a_surrogate_pair_is_one_character_and_is_accepted(ctx):
    client, _, _ = ctx
    raw = CHAT_WITH % (BASE, '[{"role":"user","content":"smile \\ud83d\\ude00"}]', "")
    assert post_raw(client, "/v1/chat/completions", raw).status_code == 200


# ---- smaller: stream_options, strict token ids, param names -------------------------------------
@pytest.mark.parametrize("stream", [False, None])
def test_stream_options_without_streaming_is_refused(ctx, stream):
    client, _, _ = ctx
    for path, body in [
        ("/v1/chat/completions", {"messages": CHAT}),
        ("/v1/completions", {"prompt": "x"}),
    ]:
        response = client.post(
            path,
            json={
                "model": BASE,
                **body,
                "stream": stream,
                "stream_options": {"include_usage": True},
            },
        )
        refused_with(response, "stream_options")


def test_stream_options_with_streaming_still_works(ctx):
    client, _, _ = ctx
    response = client.post(
        "/v1/completions",
        json={
            "model": BASE,
            "prompt": "x",
            "max_tokens": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert response.status_code == 200 and '"usage":{"prompt_tokens"' in response.text


@pytest.mark.parametrize("prompt", [[True, False], [[True]], [1, False], [1.0, 2.0]])
def test_json_booleans_and_floats_are_not_token_ids(ctx, prompt):
    client, _, engine = ctx
    before = len(engine.calls)
    response = client.post("/v1/completions", json={"model": BASE, "prompt": prompt})
    refused_with(response, "prompt")
    assert len(engine.calls) == before


def test_token_id_prompts_still_work(ctx):
    client, _, _ = ctx
    for prompt in ([1, 2, 3], [[1, 2], [3]]):
        response = client.post(
            "/v1/completions", json={"model": BASE, "prompt": prompt, "max_tokens": 1}
        )
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("raw", ["{bad", '{"model": "x",', "[1, 2"])
def test_a_body_that_is_not_json_has_no_param(ctx, raw):
    client, _, _ = ctx
    error = refused_with(post_raw(client, "/v1/chat/completions", raw), None)  # was "1"
    assert "not valid JSON" in error["message"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": 5}]},
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages.0.content",
        ),
        ("/v1/chat/completions", {"messages": CHAT, "stop": 5}, "stop"),
        ("/v1/completions", {"prompt": None}, "prompt"),
        ("/v1/completions", {"prompt": {"a": 1}}, "prompt"),
        ("/v1/completions", {"prompt": [[1, "a"]]}, "prompt"),
    ],
)
def test_a_union_field_is_named_without_pydantics_branch_names(ctx, path, body, param):
    client, _, _ = ctx
    error = refused_with(client.post(path, json={"model": BASE, **body}), param)
    # "prompt.str", "messages.0.content.list[TextPart]" were the params, and in the message
    assert "str:" not in error["message"] and "]:" not in error["message"]


def test_a_context_length_error_names_max_completion_tokens_when_that_was_sent(ctx):
    client, _, _ = ctx
    body = {"model": BASE, "messages": CHAT}
    error = refused_with(
        client.post("/v1/chat/completions", json={**body, "max_completion_tokens": 100_000}),
        "max_completion_tokens",  # was "max_tokens", a field the client never sent
    )
    assert error["code"] == "context_length_exceeded"
    refused_with(
        client.post("/v1/chat/completions", json={**body, "max_tokens": 100_000}), "max_tokens"
    )


def test_a_key_cap_error_names_max_completion_tokens_when_that_was_sent(demo_root):
    with client_for(demo_root, ScriptedEngine(["a"] * 10)) as client:
        capped = client.patch(
            f"/admin/v1/tenants/{client.tenant}/limits",
            json={"max_tokens": 4},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        assert capped.is_success, capped.text
        body = {"model": BASE, "messages": CHAT, "max_completion_tokens": 5}
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == (
        "max_completion_tokens"
    )


def rejected_by_vllm(parameter: str | None) -> EngineRejected:
    """What the embedded client raises for a request vLLM's validation refused: wrapped, as
    AsyncLLM wraps what adding a request raised, in EngineGenerateError."""
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.exceptions import EngineGenerateError

    try:
        try:
            try:
                raise VLLMValidationError("bad value", parameter=parameter)
            except VLLMValidationError as cause:
                raise EngineGenerateError() from cause
        except EngineGenerateError as wrapped:
            raise EngineRejected(
                f"the engine refused the request: {wrapped.__cause__}"
            ) from wrapped
    except EngineRejected as rejected:
        return rejected


@pytest.mark.parametrize(
    ("parameter", "stream"), [("top_p", False), ("logprobs", True), (None, False)]
)
def test_the_field_vllm_names_in_a_rejection_is_the_param(demo_root, parameter, stream):
    engine = ScriptedEngine(["a"], fail_after=0, error=rejected_by_vllm(parameter))
    with client_for(demo_root, engine) as client:
        response = client.post(
            "/v1/chat/completions", json={"model": BASE, "messages": CHAT, "stream": stream}
        )
    refused_with(response, parameter)  # was always null


# ---- the number of prompts in one request -------------------------------------------------------
def test_more_than_2048_prompts_in_one_request_are_refused(ctx):
    client, _, engine = ctx
    before = len(engine.calls)
    for prompt in (["x"] * 2049, [[1]] * 2049):
        response = client.post("/v1/completions", json={"model": BASE, "prompt": prompt})
        error = refused_with(response, "prompt")
        assert "2048" in error["message"]
    assert len(engine.calls) == before


def test_2048_prompts_and_one_prompt_of_more_token_ids_are_served(ctx):
    client, _, _ = ctx
    response = client.post(
        "/v1/completions", json={"model": BASE, "prompt": ["x"] * 2048, "max_tokens": 1}
    )
    assert response.status_code == 200 and len(response.json()["choices"]) == 2048
    # One prompt's token ids are not a list of prompts: the cap does not count them.
    response = client.post(
        "/v1/completions", json={"model": BASE, "prompt": [1] * 2049, "max_tokens": 1}
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == (
        "context_length_exceeded"
    )
    assert response.json()["error"]["param"] == "prompt"
