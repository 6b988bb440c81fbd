"""The OpenAI surface through the official client: shapes, streaming, sampling knobs, errors."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import BASE_NAME, bearer

pytestmark = pytest.mark.engine
ADAPTER = "demo-qkvo-r8"
MESSAGES = [{"role": "user", "content": "Say something about adapters."}]


@pytest.fixture(scope="module")
def client(gateway):
    return openai.OpenAI(base_url=gateway.v1, api_key=gateway.api_key, max_retries=0, timeout=60)


def test_models_lists_base_and_every_demo_adapter(client, demo):
    listed = client.models.list().data
    ids = [m.id for m in listed]
    assert ids[0] == BASE_NAME
    # Other tests of the session may register more adapters on the shared gateway.
    assert set(demo.adapters) <= set(ids[1:])
    assert len(ids) == len(set(ids))
    assert all(getattr(m, "parent", None) == BASE_NAME for m in listed[1:])
    assert client.models.retrieve(ADAPTER).id == ADAPTER


def test_chat_completion_shape_and_usage(client):
    response = client.chat.completions.create(
        model=ADAPTER, messages=MESSAGES, max_tokens=8, temperature=0
    )
    assert response.object == "chat.completion"
    assert response.id.startswith("chatcmpl-")
    assert response.model == ADAPTER
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert response.usage.completion_tokens == 8
    assert response.usage.total_tokens == response.usage.prompt_tokens + 8


def test_max_completion_tokens_is_honoured(client):
    response = client.chat.completions.create(
        model=ADAPTER, messages=MESSAGES, max_completion_tokens=3, temperature=0
    )
    assert response.usage.completion_tokens == 3


def test_streaming_chat_chunks_roles_finish_usage_and_done(client, gateway):
    full = client.chat.completions.create(
        model=ADAPTER, messages=MESSAGES, max_tokens=10, temperature=0
    )
    stream = client.chat.completions.create(
        model=ADAPTER,
        messages=MESSAGES,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])
    # The raw wire format ends with the OpenAI sentinel.
    raw = httpx.post(
        f"{gateway.v1}/chat/completions",
        json={"model": ADAPTER, "messages": MESSAGES, "max_tokens": 2, "stream": True},
        headers=bearer(gateway.api_key),
        timeout=60,
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


async def test_async_client_completion_and_stream(aclient):
    response = await aclient.completions.create(
        model=ADAPTER, prompt="Once upon", max_tokens=6, temperature=0
    )
    stream = await aclient.completions.create(
        model=ADAPTER, prompt="Once upon", max_tokens=6, temperature=0, stream=True
    )
    streamed = "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])
    assert response.object == "text_completion"
    assert streamed == response.choices[0].text


def test_n_with_seed_gives_reproducible_distinct_samples(client):
    def sample():
        return client.chat.completions.create(
            model=ADAPTER, messages=MESSAGES, max_tokens=12, temperature=1.0, n=3, seed=7
        )

    first, second = sample(), sample()
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in second.choices]
    assert len(set(texts)) > 1
    # A sample may end at EOS before max_tokens; only samples cut by length use all 12.
    finishes = [c.finish_reason for c in first.choices]
    assert set(finishes) <= {"length", "stop"}
    assert finishes.count("length") * 12 <= first.usage.completion_tokens <= 36


def test_greedy_n_returns_identical_choices_like_openai(client):
    """vLLM refuses n > 1 with greedy sampling; OpenAI answers with n identical choices."""
    single = client.chat.completions.create(
        model=ADAPTER, messages=MESSAGES, max_tokens=6, temperature=0
    )
    multi = client.chat.completions.create(
        model=ADAPTER, messages=MESSAGES, max_tokens=6, temperature=0, n=3
    )
    assert [c.index for c in multi.choices] == [0, 1, 2]
    assert {c.message.content for c in multi.choices} == {single.choices[0].message.content}
    assert multi.usage.prompt_tokens == single.usage.prompt_tokens
    assert multi.usage.completion_tokens == 18
    stream = client.completions.create(
        model=ADAPTER, prompt="Hi", max_tokens=4, temperature=0, n=2, stream=True, echo=True
    )
    texts = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts[0] == texts[1] and texts[0].startswith("Hi")


def test_stop_sequence_truncates_output(client):
    full = client.completions.create(model=ADAPTER, prompt="Hello", max_tokens=16, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), text
    stopped = client.completions.create(
        model=ADAPTER, prompt="Hello", max_tokens=16, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(stop)]


def test_chat_logprobs_with_top_alternatives(client):
    response = client.chat.completions.create(
        model=ADAPTER,
        messages=MESSAGES,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = response.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs))


def test_completion_logprobs_echo_and_multiple_prompts(client):
    response = client.completions.create(
        model=ADAPTER, prompt=["Hello", "Goodbye"], max_tokens=3, temperature=0, logprobs=2
    )
    assert [c.index for c in response.choices] == [0, 1]
    for choice in response.choices:
        assert len(choice.logprobs.tokens) == 3
        assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    echoed = client.completions.create(
        model=ADAPTER, prompt="Hello", max_tokens=3, temperature=0, echo=True
    )
    single = client.completions.create(model=ADAPTER, prompt="Hello", max_tokens=3, temperature=0)
    assert echoed.choices[0].text == "Hello" + single.choices[0].text
    assert response.choices[0].text == single.choices[0].text


def test_token_id_prompts_are_accepted(client, demo):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(demo.base).encode("Hello")
    by_ids = client.completions.create(model=ADAPTER, prompt=ids, max_tokens=5, temperature=0)
    by_text = client.completions.create(model=ADAPTER, prompt="Hello", max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_unknown_model_is_openai_not_found(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-adapter", messages=MESSAGES)
    assert info.value.body == {
        "message": "The model `no-such-adapter` does not exist or you do not have access to it.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-adapter")


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"messages": []}, "messages"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 100000}, "max_tokens"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ],
)
def test_invalid_requests_are_openai_bad_request(client, payload, param):
    body = {"model": ADAPTER, "messages": MESSAGES, "max_tokens": 4, **payload}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**body)
    error = info.value.body
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert "detail" not in info.value.response.json()


def test_non_json_body_and_unknown_route_keep_the_error_shape(gateway):
    bad = httpx.post(
        f"{gateway.v1}/completions",
        content=b"{not json",
        timeout=10,
        headers={"content-type": "application/json", **bearer(gateway.api_key)},
    )
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    missing = httpx.get(f"{gateway.v1}/nothing-here", headers=bearer(gateway.api_key), timeout=10)
    assert missing.status_code == 404 and set(missing.json()) == {"error"}


def test_unknown_fields_are_accepted_like_openai(client):
    response = client.chat.completions.create(
        model=ADAPTER, messages=MESSAGES, max_tokens=2, extra_body={"some_future_field": 1}
    )
    assert response.usage.completion_tokens == 2


def test_health_endpoints_and_request_id(gateway):
    assert httpx.get(f"{gateway.base_url}/healthz", timeout=10).json() == {"status": "ok"}
    ready = httpx.get(f"{gateway.base_url}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    echoed = httpx.get(f"{gateway.base_url}/healthz", headers={"X-Request-Id": "abc"}, timeout=10)
    assert echoed.headers["x-request-id"] == "abc"


def test_echo_with_logprobs_scores_the_prompt_under_the_adapter(client, demo):
    """lm-evaluation-harness's request (token ids, echo, logprobs 1, max_tokens 1): one entry per
    prompt token then the new one; each prompt token's logprob is HF transformers' with the
    adapter merged, and the greedy next token is the top alternative."""
    import torch

    from tests.e2e.merged_reference import merged_model

    ids = [1, 45, 102, 306, 263, 124, 289, 45, 102, 600, 3]
    response = client.completions.create(
        model=ADAPTER, prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True
    )
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(ids) + 1 == len(logprobs.token_logprobs)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    model = merged_model(demo.base, demo.adapters[ADAPTER])
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    for position in range(1, len(ids)):
        want = float(reference[position - 1, ids[position]])
        assert logprobs.token_logprobs[position] == pytest.approx(want, abs=2e-3), position
    last = logprobs.token_logprobs[-1]
    assert last == pytest.approx(max(logprobs.top_logprobs[-1].values()))
    assert last == pytest.approx(float(reference[-1].max()), abs=2e-3)
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    plain = client.completions.create(model=ADAPTER, prompt=ids, max_tokens=1, temperature=0)
    assert response.choices[0].text.endswith(plain.choices[0].text)
