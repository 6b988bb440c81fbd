"""Request parameters as OpenAI defines them, through the official openai client (and raw JSON
where the client cannot send the case): what is accepted, what is refused with which `param`,
and what reaches the engine."""

from __future__ import annotations

import openai
import pytest

from gateway.engine.client import SamplingOptions
from tests.gateway.fake_engine import (
    ADMIN_TOKEN,
    BASE,
    ScriptedEngine,
    built_demo_root,
    client_for,
    openai_context,
)

CHAT = [{"role": "user", "content": "hi"}]
INT64_MAX = 2**63 - 1


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return built_demo_root(tmp_path_factory, "params")


@pytest.fixture(scope="module")
def ctx(demo_root):
    with openai_context(demo_root, ScriptedEngine(["a", "b", "c"] * 10)) as made:
        yield made


def last_options(engine: ScriptedEngine) -> SamplingOptions:
    return engine.calls[-1][2]


def refused(call) -> dict:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    assert caught.value.status_code == 400
    return caught.value.body  # the error object


# ---- seed (int64, as vLLM's engine core takes it) ----------------------------------------------
@pytest.mark.parametrize("seed", [2**63, 2**64, -(2**63) - 1])
def test_a_seed_outside_int64_is_refused_before_the_engine(ctx, seed):
    _, sdk, engine = ctx
    before = len(engine.calls)
    error = refused(
        lambda: sdk.chat.completions.create(model=BASE, messages=CHAT, seed=seed, max_tokens=1)
    )
    assert error["param"] == "seed"
    assert len(engine.calls) == before


@pytest.mark.parametrize("seed", [INT64_MAX, -(2**63)])
def test_a_seed_at_the_int64_bounds_reaches_the_engine(ctx, seed):
    _, sdk, engine = ctx
    sdk.completions.create(model=BASE, prompt="x", seed=seed, max_tokens=1)
    assert last_options(engine).seed == seed


# ---- explicit null: the default ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "extra"),
    [
        ("/v1/chat/completions", {"n": None}),
        ("/v1/chat/completions", {"stream": None}),
        ("/v1/chat/completions", {"logprobs": None}),
        ("/v1/chat/completions", {"stream_options": None}),
        ("/v1/completions", {"max_tokens": None}),
        ("/v1/completions", {"echo": None}),
        ("/v1/completions", {"n": None, "stream": None, "logit_bias": None}),
    ],
)
def test_explicit_null_means_the_default(ctx, path, extra):
    client, _, engine = ctx
    body = {"model": BASE, **extra, **({"messages": CHAT} if "chat" in path else {"prompt": "x"})}
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    options = last_options(engine)
    assert options.n == 1 and options.stream is False and options.logprobs is None
    assert len(response.json()["choices"]) == 1


def test_null_include_usage_streams_without_a_usage_chunk(ctx):
    client, _, _ = ctx
    body = {"model": BASE, "messages": CHAT, "max_tokens": 2, "stream": True}
    response = client.post(
        "/v1/chat/completions", json={**body, "stream_options": {"include_usage": None}}
    )
    assert response.status_code == 200, response.text
    assert '"usage"' not in response.text and response.text.endswith("data: [DONE]\n\n")


def test_the_openai_client_passing_none_gets_the_defaults(ctx):
    _, sdk, _ = ctx
    chat = sdk.chat.completions.create(
        model=BASE, messages=CHAT, n=None, logprobs=None, stream=None, max_tokens=2
    )
    assert chat.choices[0].message.content == "ab" and chat.choices[0].logprobs is None
    completion = sdk.completions.create(model=BASE, prompt="x", max_tokens=None, echo=None)
    assert completion.usage.completion_tokens == 16  # OpenAI's default for /v1/completions


def test_null_is_not_accepted_for_a_field_openai_requires(ctx):
    client, _, _ = ctx
    response = client.post("/v1/completions", json={"model": BASE, "prompt": None})
    assert response.status_code == 400
    assert response.json()["error"]["param"].startswith("prompt")


# ---- completions' default max_tokens -----------------------------------------------------------
def test_completions_default_max_tokens_is_16_under_the_keys_cap(demo_root):
    engine = ScriptedEngine(["a"] * 40)
    with client_for(demo_root, engine) as client:
        client.post("/v1/completions", json={"model": BASE, "prompt": "x"}).raise_for_status()
        assert last_options(engine).max_tokens == 16
        capped = client.patch(
            f"/admin/v1/tenants/{client.tenant}/limits",
            json={"max_tokens": 8},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        assert capped.is_success, capped.text
        # Left out: the default, bounded by the cap (was: 400 for a field never sent).
        omitted = client.post("/v1/completions", json={"model": BASE, "prompt": "x"})
        assert omitted.status_code == 200, omitted.text
        assert last_options(engine).max_tokens == 8
        sent = client.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 9})
    assert sent.status_code == 400 and sent.json()["error"]["param"] == "max_tokens"


def test_completions_default_max_tokens_fits_the_tokens_per_minute_limit(demo_root):
    engine = ScriptedEngine(["a"] * 40)
    with client_for(demo_root, engine) as client:
        limited = client.patch(
            f"/admin/v1/tenants/{client.tenant}/limits",
            json={"tokens_per_minute": 12},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        assert limited.is_success, limited.text
        response = client.post("/v1/completions", json={"model": BASE, "prompt": "x"})
    assert response.status_code == 200, response.text
    prompt_tokens = response.json()["usage"]["prompt_tokens"]
    assert last_options(engine).max_tokens == 12 - prompt_tokens


# ---- logit_bias and top_logprobs -----------------------------------------------------------------
def test_logit_bias_reaches_the_engine_as_token_ids(ctx):
    _, sdk, engine = ctx
    sdk.chat.completions.create(
        model=BASE, messages=CHAT, logit_bias={"5": -100, "7": 2.5}, max_tokens=1
    )
    assert last_options(engine).logit_bias == ((5, -100.0), (7, 2.5))
    sdk.completions.create(model=BASE, prompt="x", logit_bias={"3": 100}, max_tokens=1)
    assert last_options(engine).logit_bias == ((3, 100.0),)


@pytest.mark.parametrize(
    ("bias", "param"),
    [
        ({"100000": 1}, "logit_bias"),  # beyond the vocabulary
        ({"-1": 1}, "logit_bias"),
        ({"hello": 1}, "logit_bias"),
        ({"²": 1}, "logit_bias"),  # isdigit() says yes, int() says no: was a 500
        ({"١٢": 1}, "logit_bias"),  # Arabic-Indic 12: was quietly token 12
        ({"5": 101}, "logit_bias.5"),
        ({"5": -100.5}, "logit_bias.5"),
    ],
)
def test_a_logit_bias_the_model_cannot_take_is_refused(ctx, bias, param):
    _, sdk, engine = ctx
    before = len(engine.calls)
    error = refused(lambda: sdk.chat.completions.create(model=BASE, messages=CHAT, logit_bias=bias))
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert len(engine.calls) == before


def test_top_logprobs_without_logprobs_is_refused(ctx):
    _, sdk, engine = ctx
    error = refused(lambda: sdk.chat.completions.create(model=BASE, messages=CHAT, top_logprobs=2))
    assert error["param"] == "top_logprobs"
    sdk.chat.completions.create(
        model=BASE, messages=CHAT, logprobs=True, top_logprobs=2, max_tokens=1
    )
    assert last_options(engine).logprobs == 2


def test_requests_whose_client_got_nothing_cost_the_tenant_no_tokens(demo_root):
    """While the engine is down, clients retrying their 503s drained their own budget and got
    429s once it recovered (review): a request refused before any token is refunded whole."""
    from gateway.engine.client import EngineDead

    engine = ScriptedEngine(["a"] * 4, fail_after=0, error=EngineDead("engine core died"))
    with client_for(demo_root, engine) as client:
        limits = {"tokens_per_minute": 600, "max_concurrent": 2}
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        assert client.patch(f"/admin/v1/tenants/{client.tenant}/limits", json=limits, headers=admin)
        body = {"model": BASE, "prompt": "hello there " * 40, "max_tokens": 100}
        statuses = {client.post("/v1/completions", json=body).status_code for _ in range(12)}
        assert statuses == {503}  # a charge per request would have ended in 429s
