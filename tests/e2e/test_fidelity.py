"""Adapted outputs through the HTTP API equal the merged-weight math, alone and in mixed batches."""

from __future__ import annotations

import asyncio

import openai
import pytest
from transformers import AutoTokenizer

from gateway.demo import DEMO_ADAPTERS
from tests.conftest import BASE_NAME, MAX_LORAS
from tests.e2e.merged_reference import greedy_tokens

pytestmark = pytest.mark.engine

MODELS = [BASE_NAME, *(spec.name for spec in DEMO_ADAPTERS)]
PROMPTS = ["The gateway serves", "Hello world, what is the rank of"]
MAX_TOKENS = 24


def visible_text(tokenizer, tokens: list[int]) -> str:
    """Decoded text as a streaming detokenizer shows it: a trailing half UTF-8 character (which
    vLLM holds back until it completes) is dropped rather than printed as U+FFFD."""
    return tokenizer.decode(tokens, skip_special_tokens=True).rstrip("\ufffd")


@pytest.fixture(scope="module")
def tokenizer(demo):
    return AutoTokenizer.from_pretrained(demo.base)


@pytest.fixture(scope="module")
def references(demo, tokenizer):
    """(model, prompt) → reference text from HF with the adapter merged."""
    out = {}
    for model in MODELS:
        adapter = None if model == BASE_NAME else demo.adapters[model]
        for prompt in PROMPTS:
            tokens = greedy_tokens(demo.base, adapter, tokenizer.encode(prompt), MAX_TOKENS)
            out[model, prompt] = visible_text(tokenizer, tokens)
    return out


def test_demo_adapters_cover_required_shapes():
    by_modules = {tuple(spec.target_modules): spec for spec in DEMO_ADAPTERS}
    qkvo = by_modules[("q_proj", "k_proj", "v_proj", "o_proj")]
    assert qkvo.rank >= 8 and qkvo.alpha != qkvo.rank
    all_seven = [s for s in DEMO_ADAPTERS if len(s.target_modules) == 7]
    assert all_seven and all_seven[0].rank >= 16 and all_seven[0].alpha != all_seven[0].rank
    assert any(spec.use_rslora for spec in DEMO_ADAPTERS)
    assert len(DEMO_ADAPTERS) >= MAX_LORAS


def test_adapters_change_the_output(references):
    for prompt in PROMPTS:
        texts = {model: references[model, prompt] for model in MODELS}
        assert len(set(texts.values())) == len(MODELS), texts


@pytest.mark.parametrize("model", MODELS)
def test_completion_equals_merged_reference(gateway, references, model):
    client = openai.OpenAI(base_url=gateway.v1, api_key=gateway.api_key)
    for prompt in PROMPTS:
        response = client.completions.create(
            model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
        )
        assert response.choices[0].text == references[model, prompt], (model, prompt)


@pytest.mark.parametrize("model", ["demo-all-r16", "demo-qv-rs32", BASE_NAME])
def test_chat_equals_merged_reference(gateway, demo, tokenizer, model):
    messages = [{"role": "user", "content": "Which adapter is this?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    adapter = None if model == BASE_NAME else demo.adapters[model]
    expected = visible_text(tokenizer, greedy_tokens(demo.base, adapter, prompt_ids, MAX_TOKENS))
    client = openai.OpenAI(base_url=gateway.v1, api_key=gateway.api_key)
    response = client.chat.completions.create(
        model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0
    )
    assert response.choices[0].message.content == expected
    assert response.usage.prompt_tokens == len(prompt_ids)


async def test_full_slot_mixed_burst_serves_each_request_its_own_adapter(gateway, references):
    """Every max_loras slot busy while base requests run in the same batches: no bleed."""
    client = openai.AsyncOpenAI(base_url=gateway.v1, api_key=gateway.api_key)
    jobs = [(model, prompt) for _ in range(2) for prompt in PROMPTS for model in MODELS]

    async def one(model: str, prompt: str) -> str:
        response = await client.completions.create(
            model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
        )
        return response.choices[0].text

    results = await asyncio.gather(*(one(model, prompt) for model, prompt in jobs))
    wrong = [
        (model, prompt, got)
        for (model, prompt), got in zip(jobs, results, strict=True)
        if got != references[model, prompt]
    ]
    assert not wrong, wrong
    await client.close()


async def test_streamed_burst_matches_references(gateway, references):
    client = openai.AsyncOpenAI(base_url=gateway.v1, api_key=gateway.api_key)

    async def one(model: str) -> str:
        stream = await client.completions.create(
            model=model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

    results = await asyncio.gather(*(one(model) for model in MODELS))
    assert results == [references[model, PROMPTS[0]] for model in MODELS]
    await client.close()
