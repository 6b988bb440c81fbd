"""Forced tool calls through the real engine (the session gateway: xgrammar, compact JSON) and
the official client: every model's call is to a function it was given, with arguments that
match that function's parameters, whole or streamed, and a tool's answer goes back into the
conversation."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.demo import DEMO_ADAPTERS
from tests.conftest import BASE_NAME

pytestmark = pytest.mark.engine
MODELS = [BASE_NAME, *(spec.name for spec in DEMO_ADAPTERS)]
MESSAGES = [{"role": "user", "content": "What is the weather in Oslo?"}]
CITIES = ["Oslo", "Paris", "Lima"]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": CITIES},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ALARM = {
    "type": "function",
    "function": {
        "name": "set_alarm",
        "parameters": {
            "type": "object",
            "properties": {"hour": {"type": "integer", "enum": [6, 7, 8]}},
            "required": ["hour"],
            "additionalProperties": False,
        },
    },
}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def weather_arguments_ok(arguments: str) -> bool:
    value = json.loads(arguments)
    return (
        set(value) == {"city", "unit"}
        and value["city"] in CITIES
        and value["unit"] in ("celsius", "fahrenheit")
    )


def call_ok(name: str, arguments: str) -> bool:
    if name == "get_weather":
        return weather_arguments_ok(arguments)
    return name == "set_alarm" and json.loads(arguments) in ({"hour": 6}, {"hour": 7}, {"hour": 8})


async def test_every_model_calls_the_named_function_with_valid_arguments_in_one_batch(aclient):
    async def one(model: str, tool_choice):
        return await aclient.chat.completions.create(
            model=model,
            messages=MESSAGES,
            tools=[WEATHER, ALARM],
            tool_choice=tool_choice,
            parallel_tool_calls=False,
            max_tokens=160,  # the demo's small vocabulary spends a token on most characters
            temperature=0,
        )

    jobs = [(model, choice) for model in MODELS for choice in (NAMED, "required", "none")]
    answers = await asyncio.gather(*(one(*job) for job in jobs))
    for (model, choice), answer in zip(jobs, answers, strict=True):
        made = answer.choices[0]
        if choice == "none":  # tools shown, no call asked for: text
            assert made.message.content and not made.message.tool_calls, (model, made)
            continue
        assert made.message.content is None, (model, made)
        (call,) = made.message.tool_calls
        if choice == NAMED:
            assert made.finish_reason == "stop", (model, made)
            assert call.function.name == "get_weather"
        else:
            assert made.finish_reason == "tool_calls", (model, made)
        assert call_ok(call.function.name, call.function.arguments), (model, call)


async def test_a_streamed_call_and_the_tool_answer_in_the_next_turn(aclient):
    stream = await aclient.chat.completions.create(
        model="demo-all-r16",
        messages=MESSAGES,
        tools=[WEATHER],
        tool_choice=NAMED,
        max_tokens=160,
        temperature=0,
        stream=True,
    )
    call_id, name, arguments = None, None, ""
    async for chunk in stream:
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call_id = call_id or call.id
            name = name or (call.function.name if call.function else None)
            arguments += (call.function.arguments or "") if call.function else ""
    assert call_id and name == "get_weather" and weather_arguments_ok(arguments), arguments

    history = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": "3 degrees and snowing"},
    ]
    answer = await aclient.chat.completions.create(
        model="demo-all-r16",
        messages=history,
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=8,
        temperature=0,
    )
    without_answer = await aclient.chat.completions.create(
        model="demo-all-r16",
        messages=history[:-1],
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=8,
        temperature=0,
    )
    assert answer.choices[0].message.content
    # The tool's answer is in the prompt the model read.
    assert answer.usage.prompt_tokens > without_answer.usage.prompt_tokens
