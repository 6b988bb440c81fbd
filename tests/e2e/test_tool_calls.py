"""Tool calls through the real engine (the session gateway: xgrammar, compact JSON, the Hermes
parser) and the official client: every model's forced call is to a function it was given, with
arguments that match that function's parameters, whole or streamed, and a tool's answer goes
back into the conversation. Under tool_choice "auto" a call the model writes in its own syntax
comes back as tool_calls, an answer as content, and a strict tool's arguments are enforced by
the engine."""

from __future__ import annotations

import asyncio
import json

import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

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


# The demo's random weights never choose a call by themselves: a regex makes each model write
# one in Hermes' syntax (or a plain answer), and the gateway's parser must find it.
HERMES_CALL = (
    r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "(Oslo|Paris|Lima)", '
    r'"unit": "(celsius|fahrenheit)"\}\}</tool_call>'
)
ANSWER = r"It is (sunny|cold)\."


def valid_calls_counted(gateway) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(gateway.metrics_text())
        for sample in family.samples
        if sample.name == "loraplex_tool_calls_total" and sample.labels["outcome"] == "valid"
    )


async def test_under_auto_every_model_s_call_and_answer_come_back_apart_in_one_batch(
    aclient, gateway
):
    before = valid_calls_counted(gateway)

    async def one(model: str, pattern: str, stream: bool):
        request = {
            "model": model,
            "messages": MESSAGES,
            "tools": [WEATHER, ALARM],
            "max_tokens": 160,
            "temperature": 0,
            "extra_body": {"structured_outputs": {"regex": pattern}},
        }
        if not stream:
            made = (await aclient.chat.completions.create(**request)).choices[0]
            calls = [(c.function.name, c.function.arguments) for c in made.message.tool_calls or []]
            return made.message.content, calls, made.finish_reason
        content, calls, finish = "", {}, None
        async for chunk in await aclient.chat.completions.create(**request, stream=True):
            for choice in chunk.choices:
                content += choice.delta.content or ""
                for part in choice.delta.tool_calls or []:
                    name, arguments = calls.get(part.index, ("", ""))
                    if part.function is not None:
                        name += part.function.name or ""
                        arguments += part.function.arguments or ""
                    calls[part.index] = (name, arguments)
                finish = choice.finish_reason or finish
        return content or None, list(calls.values()), finish

    jobs = [
        (model, pattern, stream)
        for model in MODELS
        for pattern in (HERMES_CALL, ANSWER)
        for stream in (False, True)
    ]
    answers = await asyncio.gather(*(one(*job) for job in jobs))
    for job, (content, calls, finish) in zip(jobs, answers, strict=True):
        if job[1] == ANSWER:
            assert content in ("It is sunny.", "It is cold.") and not calls, (job, content)
            assert finish == "stop", job
            continue
        assert not content and finish == "tool_calls", (job, content, finish)
        ((name, arguments),) = calls
        assert name == "get_weather" and weather_arguments_ok(arguments), (job, arguments)
    # Each call judged valid for its version (loraplex_tool_calls_total), streamed or not.
    assert valid_calls_counted(gateway) == before + len(MODELS) * 2


@pytest.mark.parametrize("model", [BASE_NAME, "demo-all-r16"])
async def test_under_auto_a_strict_tool_s_arguments_are_enforced_by_the_engine(
    aclient, demo, model
):
    """A strict tool (OpenAI's `strict`) under "auto": the engine compiles the tools' structural
    tag, so a call the model starts can only be one with valid arguments. Here the output may be
    a call or the one-word answer the client allows, which the logit bias rules out: the random
    weights must then write a whole, valid call."""
    x = AutoTokenizer.from_pretrained(demo.base).encode("x", add_special_tokens=False)
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    answer = await aclient.chat.completions.create(
        model=model,
        messages=MESSAGES,
        tools=[strict],
        parallel_tool_calls=False,  # the grammar ends after the first call
        max_tokens=160,
        temperature=0,
        logit_bias={str(token): -100 for token in x},
        extra_body={"structured_outputs": {"choice": ["x"]}},
    )
    made = answer.choices[0]
    assert made.finish_reason == "tool_calls", made
    (call,) = made.message.tool_calls
    assert call.function.name == "get_weather" and weather_arguments_ok(call.function.arguments)
