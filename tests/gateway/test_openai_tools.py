"""Tool calling through the gateway's seams (scripted engine): a forced call (tool_choice
"required" or a named function) reaches the engine as the tools' JSON schema and comes back as
OpenAI's tool_calls, whole and streamed; tool conversations reach the chat template; what
loraplex cannot honour ("auto" with tools where no parser is set) and malformed tool requests
are 400s naming the field. "auto" with a parser: test_openai_auto_tools.py. The real engine
making the calls: tests/e2e/test_tool_calls.py."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from gateway.engine.client import OutputConstraint
from gateway.schemas.structured import MAX_CONSTRAINT_CHARS
from tests.gateway.fake_engine import BASE, ScriptedEngine, built_demo_root, openai_context

CHAT = [{"role": "user", "content": "Weather in Oslo?"}]
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Now.", "parameters": WEATHER_PARAMETERS},
}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters: any object
NAMED = {"type": "function", "function": {"name": "get_weather"}}
REQUIRED_OUTPUT = (
    '[{"name":"get_weather","parameters":{"city":"Oslo"}},{"name":"get_time","parameters":{}}]'
)


def compact(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def engine_writing(text: str, pieces: int = 3, finish: str = "stop") -> ScriptedEngine:
    step = -(-len(text) // pieces)
    engine = ScriptedEngine([text[i : i + step] for i in range(0, len(text), step)])
    engine.finish_reason = finish
    engine.max_model_len = 1024  # tools are long prompts in the demo's small vocabulary
    return engine


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return built_demo_root(tmp_path_factory, "tools")


def chat(client, **extra):
    body = {"model": BASE, "messages": CHAT, "max_tokens": 16, **extra}
    return client.post("/v1/chat/completions", json=body)


@pytest.mark.parametrize(
    "extra",
    [
        {"response_format": {"type": "text"}},
        {"response_format": None, "tools": None, "tool_choice": None},
        {"tools": [], "tool_choice": "none"},
        {"tool_choice": "auto"},  # without tools "auto" can make no call
        {"parallel_tool_calls": False},
        {"function_call": "none"},
    ],
)
def test_asking_for_plain_text_or_no_tool_call_is_served_as_text(demo_root, extra):
    with openai_context(demo_root, engine_writing("plain")) as (client, _, engine):
        response = chat(client, **extra)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "plain"
    assert engine.calls[-1][2].constraint is None


def test_an_assistant_message_with_no_tool_calls_is_served(demo_root):
    messages = [*CHAT, {"role": "assistant", "content": "yo", "tool_calls": []}, *CHAT]
    with openai_context(demo_root, engine_writing("plain")) as (client, _, _):
        assert chat(client, messages=messages).status_code == 200


def test_a_named_call_is_generated_under_its_parameters_and_returned_as_a_tool_call(demo_root):
    with openai_context(demo_root, engine_writing('{"city":"Oslo"}')) as (_, sdk, engine):
        response = sdk.chat.completions.create(
            model=BASE, messages=CHAT, tools=[WEATHER, TIME], tool_choice=NAMED
        )
    assert engine.calls[-1][2].constraint == OutputConstraint(
        "json", compact(WEATHER_PARAMETERS), "tools"
    )
    choice = response.choices[0]
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert (call.function.name, call.function.arguments) == ("get_weather", '{"city":"Oslo"}')
    assert choice.finish_reason == "stop"  # OpenAI's for a named call


def test_required_is_an_array_of_calls_each_name_with_its_own_parameters(demo_root):
    with openai_context(demo_root, engine_writing(REQUIRED_OUTPUT)) as (_, sdk, engine):
        response = sdk.chat.completions.create(
            model=BASE,
            messages=CHAT,
            tools=[WEATHER, TIME],
            tool_choice="required",
            parallel_tool_calls=False,
        )
    schema = json.loads(engine.calls[-1][2].constraint.spec)
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema["maxItems"] == 1
    by_name = {
        c["properties"]["name"]["enum"][0]: c["properties"]["parameters"]
        for c in schema["items"]["anyOf"]
    }
    assert by_name == {
        "get_weather": WEATHER_PARAMETERS,
        "get_time": {"type": "object", "properties": {}},
    }
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    assert calls == [("get_weather", {"city": "Oslo"}), ("get_time", {})]
    assert len({c.id for c in choice.message.tool_calls}) == 2


def test_a_required_output_cut_by_max_tokens_is_returned_as_text_not_as_a_call(demo_root):
    cut = REQUIRED_OUTPUT[:30]
    with openai_context(demo_root, engine_writing(cut, finish="length")) as (client, _, _):
        body = chat(client, tools=[WEATHER], tool_choice="required").json()
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": cut}
    assert choice["finish_reason"] == "length"


def sse_chunks(response) -> list[dict]:
    lines = [line.removeprefix("data: ") for line in response.text.splitlines() if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_a_named_call_streams_its_arguments_as_they_come(demo_root):
    arguments = '{"city":"Oslo"}'
    with openai_context(demo_root, engine_writing(arguments)) as (client, _, _):
        response = chat(client, tools=[WEATHER], tool_choice=NAMED, stream=True)
    deltas = [c["choices"][0] for c in sse_chunks(response)]
    opening = deltas[0]["delta"]
    (call,) = opening["tool_calls"]
    assert opening["content"] is None and opening["role"] == "assistant"
    assert call["id"].startswith("call_") and call["function"] == {
        "name": "get_weather",
        "arguments": "",
    }
    pieces = [d["delta"]["tool_calls"][0]["function"]["arguments"] for d in deltas[1:-1]]
    assert len(pieces) == 3 and "".join(pieces) == arguments
    assert deltas[-1] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}


def test_required_streams_its_calls_whole_once_the_array_is(demo_root):
    with openai_context(demo_root, engine_writing(REQUIRED_OUTPUT)) as (client, _, _):
        response = chat(client, tools=[WEATHER, TIME], tool_choice="required", stream=True)
    deltas = [c["choices"][0] for c in sse_chunks(response)]
    assert [d["delta"].get("content", "-") for d in deltas] == [None, "-", "-"]
    calls = deltas[1]["delta"]["tool_calls"]
    assert [(c["index"], c["function"]["name"]) for c in calls] == [
        (0, "get_weather"),
        (1, "get_time"),
    ]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert deltas[2]["finish_reason"] == "tool_calls"


def test_a_tool_conversation_and_the_tools_reach_the_chat_template(demo_root):
    messages = [
        *CHAT,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "3 degrees"},
    ]
    tokenizer = AutoTokenizer.from_pretrained(demo_root / "base")
    with openai_context(demo_root, engine_writing("It is cold.")) as (client, _, engine):
        answered = chat(client, messages=messages, tools=[WEATHER], tool_choice="none")
        assert answered.status_code == 200, answered.text
        assert answered.json()["choices"][0]["message"]["content"] == "It is cold."
        prompt = tokenizer.decode(engine.prompts[-1])
        assert chat(client, messages=messages, tool_choice="none").status_code == 200
        without_tools = tokenizer.decode(engine.prompts[-1])
    expected = tokenizer.apply_chat_template(
        [
            *CHAT,
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "3 degrees"},
        ],
        tools=[WEATHER],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt == expected
    assert '{"name": "get_weather", "parameters": {"city": "Oslo"}}' in prompt
    assert "3 degrees" in prompt and "get_weather" in prompt.split("user")[0]
    assert "You may call" not in without_tools


LARGE_PARAMETERS = {"type": "object", "description": "a" * MAX_CONSTRAINT_CHARS}


@pytest.mark.parametrize(
    ("extra", "param", "unsupported"),
    [
        ({"tools": [WEATHER]}, "tool_choice", True),  # OpenAI's default with tools: auto
        ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice", True),
        ({"tool_choice": "required"}, "tool_choice", False),
        ({"tool_choice": NAMED}, "tool_choice", False),
        (
            {"tools": [TIME], "tool_choice": NAMED},  # names a function not in tools
            "tool_choice",
            False,
        ),
        ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools", False),
        (
            {
                "tools": [{"type": "function", "function": {"name": "has space"}}],
                "tool_choice": "required",
            },
            "tools.0.function.name",
            False,
        ),
        ({"tools": [{"type": "retrieval"}], "tool_choice": "required"}, "tools.0.type", False),
        (
            {
                "tools": [WEATHER],
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "tool_choice",
            False,
        ),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": LARGE_PARAMETERS}}
                ],
                "tool_choice": "required",
            },
            "tool_choice",
            False,
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": n, "parameters": {"$defs": {"d": {"type": t}}}},
                    }
                    for n, t in (("a", "string"), ("b", "integer"))
                ],
                "tool_choice": "required",
            },
            "tool_choice",
            False,
        ),
        ({"tools": [WEATHER], "tool_choice": NAMED, "ignore_eos": True}, "ignore_eos", False),
        (
            {"messages": [*CHAT, {"role": "tool", "content": "3 degrees"}], "tool_choice": "none"},
            "messages.1",
            False,
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": "x",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{}"},
                            }
                        ],
                    }
                ]
            },
            "messages.0",
            False,
        ),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions", True),
        ({"function_call": {"name": "f"}}, "function_call", True),
    ],
)
def test_a_tool_request_loraplex_cannot_honour_is_a_400_before_the_engine(
    demo_root, extra, param, unsupported
):
    with openai_context(demo_root, engine_writing("x")) as (client, _, engine):
        response = chat(client, **extra)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param), error
    assert ("loraplex does not support" in error["message"]) == unsupported, error
    assert engine.calls == []


DEEP = "[" * 5000 + "]" * 5000
HUGE = '{"n":' + "1" * 4400 + "}"  # past Python's int-from-text digit limit


@pytest.mark.parametrize("arguments", [DEEP, HUGE, "[1]", None])
def test_replayed_arguments_that_are_no_renderable_object_become_empty(demo_root, arguments):
    """As vLLM's server does with arguments that are not JSON: the call is history (a 500
    here failed every later turn, and counted against the version)."""
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
    messages = [*CHAT, {"role": "assistant", "content": None, "tool_calls": [call]}]
    tokenizer = AutoTokenizer.from_pretrained(demo_root / "base")
    with openai_context(demo_root, engine_writing("ok")) as (client, _, engine):
        response = chat(client, messages=messages)
    assert response.status_code == 200, response.text
    assert '{"name": "f", "parameters": {}}' in tokenizer.decode(engine.prompts[-1])


def test_replayed_arguments_as_an_object_are_rendered(demo_root):
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
    messages = [*CHAT, {"role": "assistant", "content": None, "tool_calls": [call]}]
    tokenizer = AutoTokenizer.from_pretrained(demo_root / "base")
    with openai_context(demo_root, engine_writing("ok")) as (client, _, engine):
        assert chat(client, messages=messages).status_code == 200
    assert '{"name": "f", "parameters": {"x": 1}}' in tokenizer.decode(engine.prompts[-1])


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("output", [DEEP, '[{"name":"get_time","parameters":' + HUGE + "}]"])
def test_a_required_output_past_the_json_decoder_is_text_not_a_500(demo_root, output, stream):
    with openai_context(demo_root, engine_writing(output)) as (client, _, _):
        response = chat(client, tools=[TIME], tool_choice="required", stream=stream)
    assert response.status_code == 200, response.text
    if stream:
        deltas = [c["choices"][0] for c in sse_chunks(response)]
        assert deltas[1]["delta"] == {"content": output} and deltas[2]["finish_reason"] == "stop"
    else:
        assert response.json()["choices"][0]["message"] == {"role": "assistant", "content": output}


def test_draft_7_definitions_move_to_the_root_of_the_required_schema(demo_root):
    ref = {"$ref": "#/definitions/city"}
    tool = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {
                "type": "object",
                "properties": {"where": ref},
                "definitions": {"city": {"type": "string"}},
            },
        },
    }
    with openai_context(demo_root, engine_writing("[]")) as (client, _, engine):
        assert chat(client, tools=[tool], tool_choice="required").status_code == 200
    schema = json.loads(engine.calls[-1][2].constraint.spec)
    assert schema["definitions"] == {"city": {"type": "string"}} and "$defs" not in schema
    parameters = schema["items"]["anyOf"][0]["properties"]["parameters"]
    assert parameters == {"type": "object", "properties": {"where": ref}}


@pytest.mark.parametrize(
    "parameters",
    [
        {"type": "object", "$defs": [1]},  # was a 500 (AttributeError)
        {"type": "object", "definitions": "x"},
        {"type": "string"},  # OpenAI's arguments are an object
    ],
)
def test_parameters_that_cannot_make_an_object_call_are_a_400(demo_root, parameters):
    tool = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    with openai_context(demo_root, engine_writing("x")) as (client, _, engine):
        response = chat(client, tools=[tool], tool_choice="required")
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "tools.0.function.parameters"
    assert engine.calls == []


@pytest.mark.parametrize(
    "parameters",
    [
        {},  # no type: an object, as OpenAI reads it
        {"type": ["object", "null"]},
        {"type": "object", "$defs": None},
        {"anyOf": [{"type": "object"}]},
    ],
)
def test_object_parameters_in_every_spelling_clients_send_are_served(demo_root, parameters):
    tool = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    named = {"type": "function", "function": {"name": "f"}}
    with openai_context(demo_root, engine_writing("{}")) as (client, _, engine):
        response = chat(client, tools=[tool], tool_choice=named)
    assert response.status_code == 200, response.text
    assert engine.calls[-1][2].constraint is not None


def test_a_chunk_the_gateway_cannot_shape_ends_the_stream_counted_as_its_error(
    demo_root, monkeypatch
):
    """Counted as a 500 (it was a client that left, 499), and the version is not blamed."""
    from prometheus_client import REGISTRY

    from gateway.services.tool_calls import ToolCallStream

    def broken(self, index, delta):
        raise RuntimeError("a bug in shaping")

    monkeypatch.setattr(ToolCallStream, "deltas", broken)
    with openai_context(demo_root, engine_writing(REQUIRED_OUTPUT)) as (client, _, _):
        response = chat(client, tools=[WEATHER], tool_choice="required", stream=True)
        tenant = client.tenant
    assert response.status_code == 200
    assert '"type":"server_error"' in response.text and response.text.endswith("data: [DONE]\n\n")
    labels = {"tenant": tenant, "adapter": "", "version": "", "route": "chat"}
    counted = {
        status: REGISTRY.get_sample_value("loraplex_requests_total", {**labels, "status": status})
        for status in ("500", "499")
    }
    assert counted == {"500": 1.0, "499": None}
