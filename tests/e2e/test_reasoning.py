"""A reasoning model through the real engine (the session gateway runs vLLM's qwen3 reasoning
parser; the demo's template opens a reasoning section when enable_thinking is true, as Qwen3's
does): the engine leaves the reasoning unconstrained and holds only the answer to the client's
schema or forced call, the gateway returns the two apart, whole and streamed alike, for the base
and every adapter in one batch. A logit bias on </think> makes the random weights end their
reasoning within a few dozen tokens."""

from __future__ import annotations

import asyncio
import json

import pytest
from transformers import AutoTokenizer

from gateway.demo import DEMO_ADAPTERS
from tests.conftest import BASE_NAME

pytestmark = pytest.mark.engine
MODELS = [BASE_NAME, *(spec.name for spec in DEMO_ADAPTERS)]
MESSAGES = [{"role": "user", "content": "What is the weather in Oslo?"}]
SKIES = ["sunny", "rain"]
FORECAST = {
    "type": "json_schema",
    "json_schema": {
        "name": "forecast",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"sky": {"type": "string", "enum": SKIES}},
            "required": ["sky"],
            "additionalProperties": False,
        },
    },
}
THINKING = {"chat_template_kwargs": {"enable_thinking": True}}
# Strong enough that every demo model ends its reasoning in time, weak enough that most
# reason first (measured: 1 to 40 tokens of reasoning across the five models).
END_BIAS = 2.5


@pytest.fixture(scope="module")
def end_bias(demo):
    tokenizer = AutoTokenizer.from_pretrained(demo.base)
    return {str(tokenizer.convert_tokens_to_ids("</think>")): END_BIAS}


def forecast_request(model: str, end_bias) -> dict:
    return {
        "model": model,
        "messages": MESSAGES,
        "max_tokens": 120,
        "temperature": 0,
        "logit_bias": end_bias,
        "response_format": FORECAST,
    }


async def forecast(aclient, model: str, end_bias, **extra):
    return await aclient.chat.completions.create(
        **forecast_request(model, end_bias), extra_body={**THINKING, **extra}
    )


async def streamed_forecast(aclient, model: str, end_bias) -> tuple[str, str, int]:
    stream = await aclient.chat.completions.create(
        **forecast_request(model, end_bias),
        stream=True,
        stream_options={"include_usage": True},
        extra_body=THINKING,
    )
    reasoning, content, reasoning_tokens = "", "", -1
    async for chunk in stream:
        if chunk.usage is not None:
            reasoning_tokens = chunk.usage.completion_tokens_details.reasoning_tokens
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning", None) or ""
            content += choice.delta.content or ""
    return reasoning, content, reasoning_tokens


async def test_only_the_answer_is_held_to_the_schema_after_free_reasoning(aclient, end_bias):
    wholes = await asyncio.gather(*(forecast(aclient, m, end_bias) for m in MODELS))
    streams = await asyncio.gather(*(streamed_forecast(aclient, m, end_bias) for m in MODELS))
    reasoned = 0
    for model, whole, stream in zip(MODELS, wholes, streams, strict=True):
        choice = whole.choices[0]
        assert choice.finish_reason == "stop", model
        assert json.loads(choice.message.content)["sky"] in SKIES, model
        reasoning = choice.message.reasoning
        assert "</think>" not in reasoning + choice.message.content, model
        details = whole.usage.completion_tokens_details
        assert details.reasoning_tokens >= 1  # the end marker at least
        # Free text before the answer: a grammar applied from the first token would have
        # allowed only '{'.
        reasoned += details.reasoning_tokens >= 5 and bool(reasoning)
        assert stream == (reasoning, choice.message.content, details.reasoning_tokens), model
    assert reasoned >= 2, [w.choices[0].message for w in wholes]


async def test_without_reasoning_wanted_the_schema_holds_from_the_first_token(aclient, end_bias):
    """include_reasoning false: as vLLM's server, the engine constrains the output at once."""
    whole = await forecast(aclient, BASE_NAME, end_bias, include_reasoning=False)
    message = whole.choices[0].message
    assert json.loads(message.content)["sky"] in SKIES
    assert getattr(message, "reasoning", None) is None
    assert whole.usage.completion_tokens_details.reasoning_tokens == 0


async def test_a_forced_call_follows_the_reasoning(aclient, end_bias):
    tool = {
        "type": "function",
        "function": {"name": "report", "parameters": FORECAST["json_schema"]["schema"]},
    }
    wholes = await asyncio.gather(
        *(
            aclient.chat.completions.create(
                model=model,
                messages=MESSAGES,
                max_tokens=120,
                temperature=0,
                logit_bias=end_bias,
                tools=[tool],
                tool_choice={"type": "function", "function": {"name": "report"}},
                extra_body=THINKING,
            )
            for model in MODELS
        )
    )
    reasoned = 0
    for model, whole in zip(MODELS, wholes, strict=True):
        message = whole.choices[0].message
        (call,) = message.tool_calls
        assert call.function.name == "report", model
        assert json.loads(call.function.arguments)["sky"] in SKIES, model
        reasoned += bool(message.reasoning) and (
            whole.usage.completion_tokens_details.reasoning_tokens >= 5
        )
    assert reasoned >= 1, [w.choices[0].message for w in wholes]
