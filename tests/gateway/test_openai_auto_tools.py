"""tool_choice "auto" through the gateway's seams (scripted engine, vLLM's real Hermes parser):
the model's <tool_call> text comes back as OpenAI's tool_calls, whole and streamed, with the
text around it as content and finish_reason "tool_calls"; an answer without a call, a call cut
by max_tokens and a malformed call come back as text; parallel_tool_calls false keeps the first
call; tools marked strict reach the engine as xgrammar's structural tag (with the client's own
format as the other branch), and not under guidance; a parser the tokenizer cannot serve stops
start-up. The real engine: tests/e2e/test_tool_calls.py."""

from __future__ import annotations

import json

import pytest

from gateway.engine.tool_parsing import ToolCallParsing, ToolParserUnusable
from tests.gateway.fake_engine import BASE, ScriptedEngine, built_demo_root, client_for
from tests.gateway.fake_engine import openai_context as scripted_context
from tests.gateway.test_openai_tools import (
    CHAT,
    TIME,
    WEATHER,
    WEATHER_PARAMETERS,
    sse_chunks,
)
from tests.gateway.test_openai_tools import engine_writing as forced_engine_writing

OSLO = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
TIME_CALL = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
STRICT_WEATHER = {"type": "function", "function": {**WEATHER["function"], "strict": True}}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return built_demo_root(tmp_path_factory, "auto-tools")


def engine_writing(text: str, pieces: int = 7, finish: str = "stop") -> ScriptedEngine:
    return forced_engine_writing(text, pieces, finish)  # finer pieces: markers span several


def openai_context(demo_root, engine, **overrides):
    return scripted_context(demo_root, engine, tool_call_parser="hermes", **overrides)


def chat(client, stream: bool = False, **extra):
    body = {"model": BASE, "messages": CHAT, "max_tokens": 512, "stream": stream, **extra}
    return client.post("/v1/chat/completions", json=body)


def test_a_call_the_model_writes_comes_back_as_tool_calls(demo_root):
    text = "Let me look. " + OSLO
    with openai_context(demo_root, engine_writing(text)) as (_, sdk, engine):
        response = sdk.chat.completions.create(model=BASE, messages=CHAT, tools=[WEATHER, TIME])
    options = engine.calls[-1][2]
    assert options.constraint is None  # no strict tool: parsed, not constrained
    assert options.skip_special_tokens is False  # Hermes' markers may be special tokens
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look. "
    (call,) = choice.message.tool_calls
    assert call.id and call.type == "function"
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather",
        {"city": "Oslo"},
    )


def test_an_answer_without_a_call_is_plain_content(demo_root):
    with openai_context(demo_root, engine_writing("It is sunny.")) as (client, _, _):
        body = chat(client, tools=[WEATHER], tool_choice="auto").json()
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "It is sunny."}
    assert choice["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "text",
    [
        OSLO[:40],  # cut by max_tokens inside the call
        '<tool_call>{"name": "get_weather", "arguments": {"city": }</tool_call>',  # no JSON
    ],
)
def test_a_call_that_is_not_whole_json_comes_back_as_text(demo_root, text):
    finish = "length" if text == OSLO[:40] else "stop"
    with openai_context(demo_root, engine_writing(text, finish=finish)) as (client, _, _):
        body = chat(client, tools=[WEATHER]).json()
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": text}
    assert choice["finish_reason"] == finish


def test_two_calls_come_back_as_two_and_parallel_false_keeps_the_first(demo_root):
    text = OSLO + TIME_CALL
    with openai_context(demo_root, engine_writing(text)) as (client, _, _):
        both = chat(client, tools=[WEATHER, TIME]).json()["choices"][0]["message"]
        first = chat(client, tools=[WEATHER, TIME], parallel_tool_calls=False).json()
    assert [c["function"]["name"] for c in both["tool_calls"]] == ["get_weather", "get_time"]
    assert len({c["id"] for c in both["tool_calls"]}) == 2 and both["content"] is None
    (call,) = first["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"


def accumulate(chunks: list[dict]) -> tuple[str, dict[int, dict], list[str | None]]:
    """Content, calls by index and finish reasons, as a client builds them from chunks."""
    content, calls, finishes = "", {}, []
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice["delta"]
            content += delta.get("content") or ""
            for part in delta.get("tool_calls") or []:
                call = calls.setdefault(part["index"], {"name": "", "arguments": ""})
                if "id" in part:
                    assert "id" not in call, "a call is opened once"
                    call["id"] = part["id"]
                    assert part["type"] == "function"
                function = part.get("function") or {}
                call["name"] += function.get("name") or ""
                call["arguments"] += function.get("arguments") or ""
            if choice["finish_reason"]:
                finishes.append(choice["finish_reason"])
    return content, calls, finishes


@pytest.mark.parametrize("pieces", [1, 7, 200])
def test_a_streamed_call_arrives_as_tool_call_deltas(demo_root, pieces):
    text = "Checking. " + OSLO + TIME_CALL
    with openai_context(demo_root, engine_writing(text, pieces=pieces)) as (client, _, _):
        response = chat(client, stream=True, tools=[WEATHER, TIME])
    assert response.status_code == 200, response.text
    content, calls, finishes = accumulate(sse_chunks(response))
    assert content == "Checking. "
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Oslo"}),
        ("get_time", {}),
    ]
    assert all(c["id"] for c in calls.values()) and finishes == ["tool_calls"]


def test_a_streamed_answer_without_a_call_is_content_and_parallel_false_streams_one(demo_root):
    with openai_context(demo_root, engine_writing("No tools needed.")) as (client, _, _):
        plain = accumulate(sse_chunks(chat(client, stream=True, tools=[WEATHER])))
    assert plain == ("No tools needed.", {}, ["stop"])
    with openai_context(demo_root, engine_writing(OSLO + TIME_CALL)) as (client, _, _):
        one = chat(client, stream=True, tools=[WEATHER, TIME], parallel_tool_calls=False)
    _, calls, finishes = accumulate(sse_chunks(one))
    assert [c["name"] for c in calls.values()] == ["get_weather"] and finishes == ["tool_calls"]


@pytest.mark.parametrize("text", ["Hello <tool", "Hello <tool_call", "Hello <tool_call>{"])
def test_text_held_back_as_a_possible_call_marker_is_streamed_at_the_end(demo_root, text):
    """As the whole body returns it: Hermes' parser holds back what may open <tool_call> and
    never releases it when the output ends there."""
    with openai_context(demo_root, engine_writing(text, pieces=len(text))) as (client, _, _):
        streamed = accumulate(sse_chunks(chat(client, stream=True, tools=[WEATHER])))
        whole = chat(client, tools=[WEATHER]).json()["choices"][0]
    assert streamed == (text, {}, ["stop"])
    assert (whole["message"]["content"], whole["finish_reason"]) == (text, "stop")


def test_each_streamed_choice_is_parsed_on_its_own(demo_root):
    with openai_context(demo_root, engine_writing(OSLO)) as (client, _, _):
        response = chat(client, stream=True, tools=[WEATHER], n=2, temperature=1.0)
    chunks = sse_chunks(response)
    for index in (0, 1):
        mine = [{**c, "choices": [x for x in c["choices"] if x["index"] == index]} for c in chunks]
        _, calls, finishes = accumulate(mine)
        assert [c["name"] for c in calls.values()] == ["get_weather"], index
        assert finishes == ["tool_calls"]


def test_a_strict_tool_is_constrained_by_a_structural_tag(demo_root):
    with openai_context(demo_root, engine_writing(OSLO)) as (client, _, engine):
        assert chat(client, tools=[STRICT_WEATHER, TIME]).status_code == 200
        tag_only = engine.calls[-1][2].constraint
        fmt = {"type": "json_object"}
        assert chat(client, tools=[STRICT_WEATHER], response_format=fmt).status_code == 200
        with_format = engine.calls[-1][2].constraint
        assert chat(client, tools=[WEATHER], response_format=fmt).status_code == 200
        format_only = engine.calls[-1][2].constraint
    assert (tag_only.kind, tag_only.param) == ("structural_tag", "tools")
    tag = json.loads(tag_only.spec)
    assert tag["format"]["triggers"] == ["<tool_call>"]
    schemas = {
        (json.loads(t["begin"].removeprefix("<tool_call>") + "0}")["name"]): t["content"][
            "json_schema"
        ]
        for t in tag["format"]["tags"]
    }
    # A call names one of the tools; only the strict one's arguments are pinned.
    assert schemas == {"get_weather": WEATHER_PARAMETERS, "get_time": True}
    # The client's format stays a branch the output may take: a call, or a JSON object.
    branches = json.loads(with_format.spec)["format"]["elements"]
    assert branches[-1]["json_schema"] == {"type": "object"}
    assert format_only.kind == "json_object"  # no strict tool: the client's format alone


def test_under_guidance_a_strict_tool_is_parsed_not_constrained(demo_root):
    with openai_context(demo_root, engine_writing(OSLO), structured_outputs_backend="guidance") as (
        client,
        _,
        engine,
    ):
        body = chat(client, tools=[STRICT_WEATHER]).json()
    assert engine.calls[-1][2].constraint is None
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_without_a_parser_auto_is_refused_before_the_engine(demo_root):
    with scripted_context(demo_root, engine_writing(OSLO)) as (client, _, engine):
        response = chat(client, tools=[WEATHER])
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "tool_choice" and "LORAPLEX_TOOL_CALL_PARSER" in error["message"]
    assert engine.calls == []


@pytest.mark.parametrize(
    ("name", "complaint"),
    [
        ("no-such-parser", "not been registered"),
        ("llama3_json", "<|python_tag|>"),
        ("openai", "fails on a plain answer"),  # registered, but a stub outside Harmony
    ],
)
def test_a_parser_the_tokenizer_cannot_serve_stops_start_up(demo_root, name, complaint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_root / "base")
    with pytest.raises(ToolParserUnusable, match="LORAPLEX_TOOL_CALL_PARSER") as raised:
        ToolCallParsing(name, tokenizer, structural_tags=True)
    assert complaint in str(raised.value)
    engine = engine_writing("x")
    with pytest.raises(ToolParserUnusable), client_for(demo_root, engine, tool_call_parser=name):
        pass


@pytest.mark.parametrize("compact", [False, True])
def test_compact_json_bounds_whitespace_in_a_strict_call_s_arguments(demo_root, compact):
    """vLLM applies compact JSON to JSON constraints but not to a structural tag's arguments,
    where the demo's weights padded a call with tabs up to max_tokens."""
    with openai_context(
        demo_root, engine_writing(OSLO), structured_outputs_compact_json=compact
    ) as (client, _, engine):
        assert chat(client, tools=[STRICT_WEATHER]).status_code == 200
    tag = json.loads(engine.calls[-1][2].constraint.spec)
    bounds = {t["content"]["max_whitespace_cnt"] for t in tag["format"]["tags"]}
    assert bounds == ({1} if compact else {None})


def nested_parameters(depth: int) -> dict:
    schema: dict = {"type": "object"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize(
    ("tool", "extra", "param", "says"),
    [
        # vLLM's request model refuses it (serialization depth): a 400, not a 500.
        (
            {"type": "function", "function": {"name": "deep", "strict": True}},
            {"parameters": nested_parameters(400)},
            "tools",
            "cannot be given",
        ),
        # The structural tag is bounded as any constraint is.
        (
            STRICT_WEATHER,
            {
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string", "description": "d" * 40_000}},
                }
            },
            "tools",
            "at most",
        ),
    ],
)
def test_strict_tools_the_engine_should_not_compile_are_400s(demo_root, tool, extra, param, says):
    tool = {**tool, "function": {**tool["function"], **extra}}
    with openai_context(demo_root, engine_writing(OSLO)) as (client, _, engine):
        engine.max_model_len = 1_000_000  # the context check would refuse it first
        response = chat(client, tools=[tool])
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"], error
    assert engine.calls == []


@pytest.mark.parametrize(
    ("tool", "extra"),
    [
        (STRICT_WEATHER, {"ignore_eos": True}),
        (STRICT_WEATHER, {"min_tokens": 5}),
        (WEATHER, {"ignore_eos": True, "parallel_tool_calls": False}),  # one call: the grammar ends
    ],
)
def test_options_that_would_break_the_call_grammar_are_refused(demo_root, tool, extra):
    with openai_context(demo_root, engine_writing(OSLO)) as (client, _, engine):
        response = chat(client, tools=[tool], **extra)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] in extra
    assert engine.calls == []


def test_a_parser_that_fails_answers_as_text_whole_and_streamed(demo_root, monkeypatch):
    from gateway.engine import tool_parsing

    def broken(*args, **kwargs):
        raise RuntimeError("parser bug")

    text = "Sunny. " + OSLO
    with openai_context(demo_root, engine_writing(text)) as (client, _, _):
        monkeypatch.setattr(tool_parsing.ChoiceParser, "whole", broken)
        monkeypatch.setattr(tool_parsing.ChoiceParser, "delta", broken)
        whole = chat(client, tools=[WEATHER]).json()["choices"][0]
        streamed = accumulate(sse_chunks(chat(client, stream=True, tools=[WEATHER])))
    assert whole["message"] == {"role": "assistant", "content": text}
    assert streamed == (text, {}, ["stop"])


def test_once_a_call_opened_deltas_reach_the_parser_in_growing_batches(demo_root, monkeypatch):
    """Parsers re-read the whole output on each delta once a call opened: one per token made
    a stream of many calls quadratic on the event loop every stream shares."""
    from gateway.engine import tool_parsing

    handed: list[int] = []
    delta = tool_parsing.ChoiceParser.delta

    def counted(self, text, *args, **kwargs):
        handed.append(len(text))
        return delta(self, text, *args, **kwargs)

    text = "Calls: " + OSLO * 50
    engine = engine_writing(text, pieces=len(text))
    engine.max_model_len = 8192
    with openai_context(demo_root, engine) as (client, _, _):
        monkeypatch.setattr(tool_parsing.ChoiceParser, "delta", counted)  # after start-up's
        response = chat(client, stream=True, tools=[WEATHER], max_tokens=len(text))
    _, calls, finishes = accumulate(sse_chunks(response))
    assert len(calls) == 50 and finishes == ["tool_calls"]
    assert all(json.loads(c["arguments"]) == {"city": "Oslo"} for c in calls.values())
    assert sum(handed) == len(text)  # every character, once
    assert len(handed) < 120, len(handed)  # 4000 one-character deltas without batching


def tool_calls_counted(outcome: str) -> float:
    from prometheus_client import REGISTRY

    total = 0.0
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            if sample.name == "loraplex_tool_calls_total" and sample.labels["outcome"] == outcome:
                total += sample.value
    return total


STRICT_ARGUMENTS = {
    "type": "function",
    "function": {
        "name": "book",
        "parameters": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "pattern": "^(a|aa)+$"},  # never run
                "seats": {"type": "integer", "minimum": 1},
            },
            "required": ["seats"],
            "additionalProperties": False,
        },
    },
}


def call(name: str, arguments: str) -> str:
    return f'<tool_call>{{"name": "{name}", "arguments": {arguments}}}</tool_call>'


OUTCOMES = ("valid", "invalid_arguments", "unknown_function", "malformed")


@pytest.mark.parametrize("stream", [False, True])
def test_each_call_is_counted_by_whether_the_client_can_make_it(demo_root, stream):
    text = (
        call("book", '{"seats": 2}')
        + call("book", '{"seats": 2, "code": "' + "a" * 5000 + 'b"}')  # patterns are not run
        + call("book", '{"seats": 0}')  # below its minimum
        + call("book", '{"seats": 2, "extra": true}')  # additionalProperties false
        + call("book", "[2]")  # not an object
        + call("book", '{"code": "a"}')  # seats required
        + call("get_weather", '{"city": "Oslo"}')
        + call("fly", "{}")  # never given
    )
    before = {o: tool_calls_counted(o) for o in OUTCOMES}
    with openai_context(demo_root, engine_writing(text, pieces=40)) as (client, _, _):
        response = chat(client, stream=stream, tools=[STRICT_ARGUMENTS, WEATHER])
        assert response.status_code == 200
        if stream:
            _, calls, _ = accumulate(sse_chunks(response))
            assert len(calls) == 8
    counted = {o: tool_calls_counted(o) - before[o] for o in OUTCOMES}
    assert counted == {"valid": 3, "invalid_arguments": 4, "unknown_function": 1, "malformed": 0}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("text", "finish", "counted"),
    [
        # Hermes reads no call from broken JSON: the model wrote a malformed call.
        ('<tool_call>{"name": "get_weather", "arguments": {"city": }</tool_call>', "stop", 1),
        # Cut by max_tokens: the half call is not the model's to answer for (and Hermes then
        # returns the whole output as text, the whole call before it too).
        (OSLO + OSLO[:40], "length", 0),
    ],
)
def test_malformed_calls_are_counted_alike_whole_and_streamed_and_cut_ones_not(
    demo_root, stream, text, finish, counted
):
    before = {o: tool_calls_counted(o) for o in OUTCOMES}
    engine = engine_writing(text, pieces=20, finish=finish)
    with openai_context(demo_root, engine) as (client, _, _):
        assert chat(client, stream=stream, tools=[WEATHER]).status_code == 200
    after = {o: tool_calls_counted(o) - before[o] for o in OUTCOMES}
    assert after == {
        "valid": 0,
        "invalid_arguments": 0,
        "unknown_function": 0,
        "malformed": counted,
    }


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("stop_reason", "client_stop", "counted"),
    [
        (128008, None, 1),  # the model's own end (generation_config's eos ids): judged
        ("</tool_call>", ["</tool_call>"], 0),  # the client's stop string cut the call
    ],
)
def test_only_a_stop_the_client_sent_cuts_an_output(
    demo_root, stream, stop_reason, client_stop, counted
):
    """vLLM reports the model's extra end-of-sequence ids (Llama 3.1's <|eom_id|>) as a
    stop_reason too: such calls were never judged (found by review)."""
    engine = engine_writing(OSLO)
    engine.stop_reason = stop_reason
    before = tool_calls_counted("valid")
    with openai_context(demo_root, engine) as (client, _, _):
        extra = {"stop": client_stop} if client_stop else {}
        assert chat(client, stream=stream, tools=[WEATHER], **extra).status_code == 200
    assert tool_calls_counted("valid") == before + counted
