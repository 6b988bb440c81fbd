"""Reasoning models through the gateway's seams (an engine writing the demo tokenizer's real
token ids, vLLM's real qwen3 and deepseek_r1 parsers): with LORAPLEX_REASONING_PARSER the
reasoning comes back apart from the content, whole and streamed alike, counted in usage, and
not at all with include_reasoning false; the chat template's switches (chat_template_kwargs,
reasoning_effort) open or close the reasoning in the prompt; a constraint starts where the
reasoning ends; tool calls, forced or written by the model, are read from the content only.
The real engine: tests/e2e/test_reasoning.py."""

from __future__ import annotations

import json
from typing import Any

import pytest
from transformers import AutoTokenizer

from gateway.engine.client import ChoiceDelta, GenerationUpdate, TokenLogprob
from gateway.engine.reasoning_parsing import ReasoningParserUnusable
from tests.gateway.fake_engine import BASE, ScriptedEngine, built_demo_root, openai_context
from tests.gateway.test_openai_auto_tools import OSLO, tool_calls_counted
from tests.gateway.test_openai_tools import CHAT, NAMED, WEATHER, sse_chunks

THINKING = {"enable_thinking": True}
REASONING = "The user asks about Oslo. I know it."
ANSWER = "It is sunny."


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return built_demo_root(tmp_path_factory, "reasoning")


@pytest.fixture(scope="module")
def tokenizer(demo_root):
    return AutoTokenizer.from_pretrained(demo_root / "base")


class TokenEngine(ScriptedEngine):
    """Writes `text` as the demo tokenizer's tokens, `per_delta` at a time (a real engine's
    deltas: a marker such as </think> is one token, never split), with a logprob per token
    when asked."""

    def __init__(self, tokenizer: Any, text: str, per_delta: int = 2, finish: str = "stop"):
        super().__init__([])
        self.ids = tokenizer.encode(text, add_special_tokens=False)
        self.tokenizer = tokenizer
        self.per_delta = per_delta
        self.finish_reason = finish
        self.max_model_len = 1024

    async def generate(self, request_id, prompt_token_ids, options, adapter):
        self.calls.append((request_id, adapter, options))
        self.prompts.append(list(prompt_token_ids))
        ids = self.ids[: options.max_tokens]
        for start in range(0, len(ids), self.per_delta):
            piece = ids[start : start + self.per_delta]
            last = start + self.per_delta >= len(ids)
            logprobs = None
            if options.logprobs is not None:
                logprobs = [
                    TokenLogprob(self.tokenizer.decode([i]), -0.5 - position)
                    for position, i in enumerate(piece, start)
                ]
            yield GenerationUpdate(
                prompt_tokens=len(prompt_token_ids),
                choices=[
                    ChoiceDelta(
                        c,
                        self.tokenizer.decode(piece),
                        list(piece),
                        logprobs,
                        self.finish_reason if last else None,
                    )
                    for c in range(options.n)
                ],
                finished=last,
            )


def context(demo_root, engine, parser: str = "qwen3", **overrides):
    return openai_context(demo_root, engine, reasoning_parser=parser, **overrides)


def chat(client, stream: bool = False, **extra):
    body = {"model": BASE, "messages": CHAT, "max_tokens": 200, "stream": stream, **extra}
    return client.post("/v1/chat/completions", json=body)


def logprob_tokens(chunks: list[dict]) -> list[str]:
    """The tokens a chat stream's first choices carried logprobs for, in order."""
    return [
        entry["token"]
        for chunk in chunks
        if chunk["choices"] and chunk["choices"][0]["logprobs"]
        for entry in chunk["choices"][0]["logprobs"]["content"]
    ]


def streamed(response) -> tuple[str, str, list[dict]]:
    """(reasoning, content, chunks) of a chat stream's first choice."""
    chunks = sse_chunks(response)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    reasoning = "".join(d.get("reasoning") or "" for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    return reasoning, content, chunks


@pytest.mark.parametrize("per_delta", [1, 2, 5])
@pytest.mark.parametrize("parser", ["qwen3", "deepseek_r1"])
@pytest.mark.parametrize(
    "written", [f"{REASONING}</think>{ANSWER}", f"<think>{REASONING}</think>{ANSWER}"]
)
def test_the_reasoning_comes_back_apart_whole_and_streamed(
    demo_root, tokenizer, parser, written, per_delta
):
    """The prompt opens the reasoning (enable_thinking); the model may or may not repeat the
    opening marker; deltas of one token or several (an engine ahead of its client merges
    them)."""
    engine = TokenEngine(tokenizer, written, per_delta)
    with context(demo_root, engine, parser) as (client, sdk, _):
        whole = sdk.chat.completions.create(
            model=BASE, messages=CHAT, extra_body={"chat_template_kwargs": THINKING}
        )
        stream = chat(
            client,
            stream=True,
            chat_template_kwargs=THINKING,
            stream_options={"include_usage": True},
        )
    assert tokenizer.decode(engine.prompts[0]).endswith("<think>\n")
    message = whole.choices[0].message
    assert message.content == ANSWER
    assert message.reasoning == REASONING  # vLLM's field, which the SDK keeps as an extra
    written_ids = tokenizer.encode(written, add_special_tokens=False)
    answer_ids = len(tokenizer.encode(ANSWER, add_special_tokens=False))
    details = whole.usage.completion_tokens_details
    assert details.reasoning_tokens == len(written_ids) - answer_ids
    reasoning, content, chunks = streamed(stream)
    assert (reasoning, content) == (REASONING, ANSWER)
    assert chunks[-1]["usage"]["completion_tokens_details"] == {
        "reasoning_tokens": details.reasoning_tokens
    }
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"


def test_a_prompt_that_closed_the_reasoning_leaves_the_output_all_content(demo_root, tokenizer):
    """The demo's template closes an empty reasoning section unless thinking is on (as
    Qwen3's): the model's whole output is the answer, markers it writes included."""
    text = f"{ANSWER} A </think> stays."
    engine = TokenEngine(tokenizer, text)
    with context(demo_root, engine) as (client, _, _):
        whole = chat(client).json()
        _, content, chunks = streamed(
            chat(client, stream=True, stream_options={"include_usage": True})
        )
    assert tokenizer.decode(engine.prompts[0]).endswith("<think>\n\n</think>\n\n")
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert whole["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}
    assert content == text
    assert not any("reasoning" in c["choices"][0]["delta"] for c in chunks if c["choices"])
    assert chunks[-1]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}


def test_without_a_reasoning_parser_nothing_is_split_or_counted(demo_root, tokenizer):
    text = f"{REASONING}</think>{ANSWER}"
    with openai_context(demo_root, TokenEngine(tokenizer, text)) as (client, _, _):
        body = chat(client, chat_template_kwargs=THINKING).json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert "completion_tokens_details" not in body["usage"]


def test_include_reasoning_false_returns_only_the_answer_and_its_logprobs(demo_root, tokenizer):
    engine = TokenEngine(tokenizer, f"{REASONING}</think>{ANSWER}", per_delta=3)
    answer_tokens = [
        tokenizer.decode([i]) for i in tokenizer.encode(ANSWER, add_special_tokens=False)
    ]
    extra = {"chat_template_kwargs": THINKING, "include_reasoning": False, "logprobs": True}
    with context(demo_root, engine) as (client, _, _):
        whole = chat(client, **extra).json()
        reasoning, content, chunks = streamed(chat(client, stream=True, **extra))
    choice = whole["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": ANSWER}
    assert [e["token"] for e in choice["logprobs"]["content"]] == answer_tokens
    assert whole["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0
    assert (reasoning, content) == ("", ANSWER)
    assert logprob_tokens(chunks) == answer_tokens


@pytest.mark.parametrize("per_delta", [1, 3])  # one token: the markers' logprobs come alone
def test_with_reasoning_the_logprobs_cover_every_token_whole_and_streamed(
    demo_root, tokenizer, per_delta
):
    written = f"{REASONING}</think>{ANSWER}"
    every = [tokenizer.decode([i]) for i in tokenizer.encode(written, add_special_tokens=False)]
    extra = {"chat_template_kwargs": THINKING, "logprobs": True}
    with context(demo_root, TokenEngine(tokenizer, written, per_delta)) as (client, _, _):
        whole = chat(client, **extra).json()
        _, _, chunks = streamed(chat(client, stream=True, **extra))
    assert [e["token"] for e in whole["choices"][0]["logprobs"]["content"]] == every
    assert logprob_tokens(chunks) == every


def test_an_output_cut_while_reasoning_has_reasoning_and_no_content(demo_root, tokenizer):
    engine = TokenEngine(tokenizer, f"{REASONING}</think>{ANSWER}", finish="length")
    with context(demo_root, engine) as (client, _, _):
        body = chat(client, chat_template_kwargs=THINKING, max_tokens=5).json()
    choice = body["choices"][0]
    assert choice["message"]["content"] is None
    assert REASONING.startswith(choice["message"]["reasoning"]) and choice["message"]["reasoning"]
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 5


@pytest.mark.parametrize(
    ("extra", "thinking"),
    [
        ({"reasoning_effort": "high"}, True),
        ({"reasoning_effort": "none"}, False),
        ({"reasoning_effort": "low", "chat_template_kwargs": {"enable_thinking": False}}, False),
        ({"chat_template_kwargs": {"enable_thinking": True, "not_in_the_template": 1}}, True),
        ({}, False),
    ],
)
def test_reasoning_effort_and_template_switches_reach_the_template(
    demo_root, tokenizer, extra, thinking
):
    """As vLLM's server: effort "none" turns thinking off, any other on, unless the client
    set enable_thinking itself; a switch the template does not read is ignored."""
    engine = TokenEngine(tokenizer, ANSWER)
    with context(demo_root, engine) as (client, _, _):
        assert chat(client, **extra).status_code == 200
    prompt = tokenizer.decode(engine.prompts[0])
    assert prompt.endswith("<think>\n") is thinking
    assert prompt.endswith("</think>\n\n") is not thinking


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"bos_token": "x"}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": []}, "chat_template_kwargs"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"include_reasoning": "maybe"}, "include_reasoning"),
        ({"thinking_token_budget": 64}, "thinking_token_budget"),
    ],
)
def test_bad_reasoning_fields_are_400s_naming_them(demo_root, tokenizer, extra, param):
    engine = TokenEngine(tokenizer, ANSWER)
    with context(demo_root, engine) as (client, _, _):
        response = chat(client, **extra)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert engine.calls == []


def test_a_switch_the_template_cannot_use_is_a_400(demo_root, tokenizer):
    """enable_thinking is read as a test; a template doing arithmetic with a switch fails on
    a string: the client's switch, not the server's fault."""
    engine = TokenEngine(tokenizer, ANSWER)
    with context(demo_root, engine) as (client, _, _):
        tok = client.app.state.generation._prompts._tokenizer
        tok.chat_template = tok.chat_template + "{{ effort + 1 }}"
        response = chat(client, chat_template_kwargs={"effort": "high"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "chat_template_kwargs"


SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "w",
        "schema": {"type": "object", "properties": {"t": {"type": "integer"}}},
    },
}


@pytest.mark.parametrize(
    ("extra", "ended"),
    [
        ({"chat_template_kwargs": THINKING, "response_format": SCHEMA}, False),
        ({"response_format": SCHEMA}, True),  # the prompt closed the reasoning
        (
            {
                "chat_template_kwargs": THINKING,
                "include_reasoning": False,
                "response_format": SCHEMA,
            },
            True,  # no reasoning wanted: constrained from the first token, as vLLM's server
        ),
        ({"chat_template_kwargs": THINKING}, None),  # no constraint: nothing to tell
    ],
)
def test_the_engine_is_told_where_a_constraint_starts(demo_root, tokenizer, extra, ended):
    engine = TokenEngine(tokenizer, f'{REASONING}</think>{{"t":3}}')
    with context(demo_root, engine) as (client, _, _):
        body = chat(client, **extra).json()
    assert engine.calls[0][2].reasoning_ended is ended
    message = body["choices"][0]["message"]
    if ended is False:  # the engine constrained only the answer: it is whole JSON
        assert (message["reasoning"], json.loads(message["content"])) == (REASONING, {"t": 3})


def test_with_include_reasoning_false_a_constrained_output_is_all_content(demo_root, tokenizer):
    """The engine constrained it from the first token: nothing in it is reasoning, though
    the prompt opened a reasoning section."""
    engine = TokenEngine(tokenizer, '{"t":3}')
    extra = {
        "chat_template_kwargs": THINKING,
        "include_reasoning": False,
        "response_format": SCHEMA,
    }
    with context(demo_root, engine) as (client, _, _):
        body = chat(client, **extra).json()
        _, content, _ = streamed(chat(client, stream=True, **extra))
    assert body["choices"][0]["message"] == {"role": "assistant", "content": '{"t":3}'}
    assert content == '{"t":3}'


@pytest.mark.parametrize(
    ("parser", "considered"),
    [
        ("deepseek_r1", "Maybe <tool_call>{</tool_call> or not."),
        # Qwen3's parser reads a call's opening marker as the end of the reasoning (Qwen3
        # models call tools without closing it), so its reasoning holds none.
        ("qwen3", "Maybe a tool, or not."),
    ],
)
def test_calls_are_read_from_the_answer_only(demo_root, tokenizer, parser, considered):
    """A <tool_call> the model considers while reasoning is not a call (nor a malformed one);
    the call in its answer is, whole and streamed."""
    engine = TokenEngine(tokenizer, f"{considered}</think>Checking. {OSLO}")
    valid, malformed = tool_calls_counted("valid"), tool_calls_counted("malformed")
    with context(demo_root, engine, parser, tool_call_parser="hermes") as (client, _, _):
        whole = chat(client, tools=[WEATHER], chat_template_kwargs=THINKING).json()
        reasoning, content, chunks = streamed(
            chat(client, stream=True, tools=[WEATHER], chat_template_kwargs=THINKING)
        )
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["reasoning"] == considered
    assert choice["message"]["content"] == "Checking. "
    (call,) = choice["message"]["tool_calls"]
    assert (call["function"]["name"], json.loads(call["function"]["arguments"])) == (
        "get_weather",
        {"city": "Oslo"},
    )
    assert (reasoning, content) == (considered, "Checking. ")
    calls = [
        call
        for chunk in chunks
        if chunk["choices"]
        for call in chunk["choices"][0]["delta"].get("tool_calls") or ()
    ]
    assert calls[0]["function"]["name"] == "get_weather"
    arguments = "".join(call["function"].get("arguments") or "" for call in calls)
    assert json.loads(arguments) == {"city": "Oslo"}
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"
    assert tool_calls_counted("valid") - valid == 2  # the whole body's and the stream's
    assert tool_calls_counted("malformed") == malformed


def test_a_forced_call_is_the_answer_after_the_reasoning(demo_root, tokenizer):
    engine = TokenEngine(tokenizer, f'{REASONING}</think>{{"city":"Oslo"}}')
    extra = {"tools": [WEATHER], "tool_choice": NAMED, "chat_template_kwargs": THINKING}
    with context(demo_root, engine) as (client, _, _):
        whole = chat(client, **extra).json()
        reasoning, _, chunks = streamed(chat(client, stream=True, **extra))
    assert engine.calls[0][2].reasoning_ended is False  # the call's grammar waits for it
    message = whole["choices"][0]["message"]
    assert message["reasoning"] == REASONING
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"city": "Oslo"}
    assert reasoning == REASONING
    arguments = "".join(
        call["function"].get("arguments") or ""
        for chunk in chunks
        if chunk["choices"]
        for call in chunk["choices"][0]["delta"].get("tool_calls") or ()
    )
    assert json.loads(arguments) == {"city": "Oslo"}


def test_a_failing_parser_costs_the_client_nothing(demo_root, tokenizer, monkeypatch):
    """A parser's bug: the output comes back as content, whole and streamed."""
    from vllm.parser.abstract_parser import DelegatingParser

    def broken(*args, **kwargs):
        raise RuntimeError("parser bug")

    written = f"{REASONING}</think>{ANSWER}"
    with context(demo_root, TokenEngine(tokenizer, written)) as (client, _, _):
        monkeypatch.setattr(DelegatingParser, "parse", broken)
        monkeypatch.setattr(DelegatingParser, "parse_delta", broken)
        whole = chat(client, chat_template_kwargs=THINKING).json()
        _, content, _ = streamed(chat(client, stream=True, chat_template_kwargs=THINKING))
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": written}
    assert content == written


@pytest.mark.parametrize("name", ["no-such-parser", "mistral"])
def test_a_parser_the_tokenizer_cannot_serve_stops_start_up(demo_root, tokenizer, name):
    """An unknown name, or a parser whose markers the tokenizer lacks ([THINK] for mistral)."""
    engine = TokenEngine(tokenizer, ANSWER)
    with (
        pytest.raises(ReasoningParserUnusable, match="LORAPLEX_REASONING_PARSER"),
        context(demo_root, engine, name),
    ):
        pass


def test_n_choices_are_split_each_with_its_own_parser(demo_root, tokenizer):
    engine = TokenEngine(tokenizer, f"{REASONING}</think>{ANSWER}")
    with context(demo_root, engine) as (client, _, _):
        whole = chat(client, n=3, temperature=1, chat_template_kwargs=THINKING).json()
        chunks = sse_chunks(
            chat(client, stream=True, n=3, temperature=1, chat_template_kwargs=THINKING)
        )
    assert [c["message"]["reasoning"] for c in whole["choices"]] == [REASONING] * 3
    for index in range(3):
        deltas = [
            c["choices"][0]["delta"]
            for c in chunks
            if c["choices"] and c["choices"][0]["index"] == index
        ]
        assert "".join(d.get("reasoning") or "" for d in deltas) == REASONING
        assert "".join(d.get("content") or "" for d in deltas) == ANSWER


def test_parsers_built_per_choice_never_rebuild_the_vocabulary(demo_root, tokenizer, monkeypatch):
    """vLLM's parsers read get_vocab() as they are built, one per choice: the gateway's
    tokenizer is vLLM's cached proxy (a 151k vocabulary took 77 ms per build otherwise)."""
    from transformers import PreTrainedTokenizerFast

    engine = TokenEngine(tokenizer, f"{REASONING}</think>{ANSWER}")
    with context(demo_root, engine, tool_call_parser="hermes") as (client, _, _):
        built: list[int] = []
        original = PreTrainedTokenizerFast.get_vocab

        def counted(self):
            built.append(1)
            return original(self)

        monkeypatch.setattr(PreTrainedTokenizerFast, "get_vocab", counted)
        assert chat(client, n=2, temperature=1, chat_template_kwargs=THINKING).status_code == 200
        streamed(chat(client, stream=True, tools=[WEATHER], chat_template_kwargs=THINKING))
    assert built == []


SPLIT_CASES = [
    f"{REASONING}</think>{ANSWER}",
    f"<think>{REASONING}</think>{ANSWER}",
    "</think>" + ANSWER,  # Qwen3's whole parse left this marker in the answer
    "<think></think>" + ANSWER,
    "Hmm.</think>\n\nA </think> B",  # a second marker is the answer's text
    "Hmm <think> more </think> ok",
    REASONING,  # cut while reasoning
    f"{REASONING}\n{OSLO}",  # Qwen3 ends reasoning at a call's marker, several tokens here
    "Naïve café, déjà vu.</think>Ça va été.",  # characters of several tokens
]


def deltas_of(tokenizer, ids: list[int], sizes: list[int]) -> list[ChoiceDelta]:
    """The output in deltas of `sizes` tokens, their text as vLLM's incremental detokenizer
    sends it: token by token, a token that ends in half a character adds its text only once
    the character is whole."""
    texts, sent = [], ""
    for at in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:at])
        whole = not text.endswith("\ufffd") or at == len(ids)
        texts.append(text[len(sent) :] if whole else "")
        sent = text if whole else sent
    out, at = [], 0
    for size in sizes:
        piece = ids[at : at + size]
        logprobs = [TokenLogprob(f"t{at + k}", -1.0) for k in range(len(piece))]
        text = "".join(texts[at : at + len(piece)])
        at += len(piece)
        last = at >= len(ids)
        out.append(ChoiceDelta(0, text, piece, logprobs, "stop" if last else None))
        if last:
            break
    return out


@pytest.mark.parametrize("parser", ["qwen3", "deepseek_r1"])
@pytest.mark.parametrize("written", SPLIT_CASES)
@pytest.mark.parametrize("thinking", [True, False])
def test_a_whole_body_splits_as_any_stream_of_it_does(tokenizer, parser, written, thinking):
    """Reasoning, answer, reasoning token count and every token's logprob on its side come
    out the same whole and streamed, in deltas of one token or of several (an engine ahead of
    its client merges them), half characters included."""
    import random

    from gateway.engine.reasoning_parsing import ReasoningParsing

    parsing = ReasoningParsing(parser, tokenizer, tool_call_parser="hermes")
    prompt = tokenizer.encode(
        "<|start_header_id|>assistant<|end_header_id|>\n\n" + ("<think>\n" if thinking else ""),
        add_special_tokens=False,
    )
    ids = tokenizer.encode(written, add_special_tokens=False)
    text = tokenizer.decode(ids)
    all_logprobs = [TokenLogprob(f"t{k}", -1.0) for k in range(len(ids))]
    whole = parsing.whole(text, ids, prompt, {}, all_logprobs)
    assert len(whole.reasoning_logprobs) == whole.reasoning_tokens
    assert whole.reasoning_logprobs + whole.content_logprobs == all_logprobs
    assert len(whole.content_token_ids) == len(ids) - whole.reasoning_tokens
    rng = random.Random(len(written))
    for sizes in ([1] * len(ids), [3] * len(ids), [rng.randint(1, 4) for _ in ids]):
        stream = parsing.stream(prompt, {})
        reasoning, content, reasoning_lp, content_lp, content_ids = "", "", [], [], []
        for delta in deltas_of(tokenizer, ids, sizes):
            said, said_lp, answer = stream.split(delta)
            reasoning += said
            reasoning_lp += said_lp or []
            content += answer.text
            content_lp += answer.logprobs or []
            content_ids += answer.token_ids
        assert (reasoning, content) == (whole.reasoning, whole.content), sizes
        assert stream.reasoning_tokens == whole.reasoning_tokens, sizes
        assert (reasoning_lp, content_lp) == (whole.reasoning_logprobs, whole.content_logprobs)
        assert content_ids == whole.content_token_ids
    assert "</think>" not in whole.reasoning


def test_a_switch_the_parser_cannot_take_is_a_400(demo_root, tokenizer):
    """vLLM's Qwen3 parser caches its config by enable_thinking: a list there raised TypeError,
    which was a 500."""
    engine = TokenEngine(tokenizer, ANSWER)
    with context(demo_root, engine) as (client, _, _):
        for bad in ([1], {"a": 1}):
            response = chat(client, chat_template_kwargs={"enable_thinking": bad})
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == "chat_template_kwargs"
    assert engine.calls == []


def test_the_engine_gets_the_switches_with_a_constraint_after_reasoning(demo_root, tokenizer):
    engine = TokenEngine(tokenizer, f'{REASONING}</think>{{"t":3}}')
    with context(demo_root, engine) as (client, _, _):
        chat(client, response_format=SCHEMA, reasoning_effort="high")
    options = engine.calls[0][2]
    assert options.reasoning_ended is False
    assert options.reasoning_switches == {"reasoning_effort": "high", "enable_thinking": True}


def test_special_tokens_are_kept_only_for_outputs_that_are_split(demo_root, tokenizer, monkeypatch):
    """A parser whose markers are special tokens needs them in the text; an output the prompt
    already closed the reasoning of is not parsed, and is detokenized as without a parser."""
    from gateway.engine.reasoning_parsing import ReasoningParsing

    monkeypatch.setattr(ReasoningParsing, "skip_special_tokens", False, raising=False)
    original = ReasoningParsing.__init__

    def keeping_special_tokens(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.skip_special_tokens = False

    monkeypatch.setattr(ReasoningParsing, "__init__", keeping_special_tokens)
    engine = TokenEngine(tokenizer, ANSWER)
    with context(demo_root, engine) as (client, _, _):
        chat(client)
        chat(client, chat_template_kwargs=THINKING)
    assert [call[2].skip_special_tokens for call in engine.calls] == [True, False]


def test_a_forced_call_opens_after_the_reasoning_streams(demo_root, tokenizer):
    """As vLLM's server streams it: reasoning first, then the call with its id and name."""
    engine = TokenEngine(tokenizer, f'{REASONING}</think>{{"city":"Oslo"}}')
    extra = {"tools": [WEATHER], "tool_choice": NAMED, "chat_template_kwargs": THINKING}
    with context(demo_root, engine) as (client, _, _):
        chunks = sse_chunks(chat(client, stream=True, **extra))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "tool_calls" not in deltas[0]
    kinds = [
        "reasoning" if "reasoning" in d else "call"
        for d in deltas
        if d.get("reasoning") or d.get("tool_calls")
    ]
    assert kinds == sorted(kinds, key=["reasoning", "call"].index)  # all reasoning first
    calls = [call for d in deltas for call in d.get("tool_calls") or ()]
    assert calls[0]["id"] and calls[0]["function"]["name"] == "get_weather"
    assert sum(1 for call in calls if "id" in call) == 1


@pytest.mark.parametrize("parser", ["deepseek_r1", "qwen3"])
def test_a_long_reasoning_keeps_no_history_in_the_parser(tokenizer, parser):
    """vLLM's <think>-token parsers concatenate their whole history on every delta: 32k tokens
    of reasoning took 11 s of the event loop every stream shares. They read only which marker
    tokens came, so that is all the gateway lets them keep (Qwen3's engine-based parser keeps
    none of its own)."""
    from gateway.engine.reasoning_parsing import ReasoningParsing

    parsing = ReasoningParsing(parser, tokenizer)
    prompt = tokenizer.encode("<think>\n", add_special_tokens=False)
    stream = parsing.stream(prompt, {})
    word = tokenizer.encode(" hello", add_special_tokens=False)
    opening = tokenizer.encode("<think>", add_special_tokens=False)
    stream.split(ChoiceDelta(0, "<think>", opening))
    for _ in range(500):
        said, _, answer = stream.split(ChoiceDelta(0, " hello", word))
        assert (said, answer.text) == (" hello", "")
    state = stream._parser._stream_state
    assert len(state.previous_text) < 10 and len(state.previous_token_ids) <= 2
    closing = tokenizer.encode("</think>ok", add_special_tokens=False)
    _, _, answer = stream.split(ChoiceDelta(0, "</think>ok", closing))
    assert answer.text == "ok" and stream.reasoning_tokens == 502


@pytest.mark.parametrize("parser", ["qwen3", "deepseek_r1"])
@pytest.mark.parametrize("written", [f"Think.\n{OSLO}", f"{REASONING}</think>{ANSWER}"])
def test_every_cut_of_the_output_in_two_splits_as_the_whole(tokenizer, parser, written):
    """Two deltas, cut at every token: inside a call's marker of several tokens (which ends
    Qwen3's reasoning, and which its parser holds back), at the end marker, anywhere."""
    from gateway.engine.reasoning_parsing import ReasoningParsing

    parsing = ReasoningParsing(parser, tokenizer, tool_call_parser="hermes")
    prompt = tokenizer.encode("<think>\n", add_special_tokens=False)
    ids = tokenizer.encode(written, add_special_tokens=False)
    all_logprobs = [TokenLogprob(f"t{k}", -1.0) for k in range(len(ids))]
    whole = parsing.whole(tokenizer.decode(ids), ids, prompt, {}, all_logprobs)
    for cut in range(1, len(ids)):
        stream = parsing.stream(prompt, {})
        got = [stream.split(d) for d in deltas_of(tokenizer, ids, [cut, len(ids)])]
        reasoning = "".join(said for said, _, _ in got)
        content = "".join(answer.text for _, _, answer in got)
        content_logprobs = [lp for _, _, answer in got for lp in answer.logprobs or []]
        assert (reasoning, content) == (whole.reasoning, whole.content), cut
        assert stream.reasoning_tokens == whole.reasoning_tokens, cut
        assert content_logprobs == whole.content_logprobs, cut


@pytest.mark.parametrize("parser", ["qwen3", "deepseek_r1"])
def test_a_marker_spelled_out_before_the_real_one_stays_text(tokenizer, parser):
    """The model wrote "</think>" in ordinary tokens, then the marker token: the split is at
    the token, whole as streamed."""
    from gateway.engine.reasoning_parsing import ReasoningParsing

    parsing = ReasoningParsing(parser, tokenizer)
    prompt = tokenizer.encode("<think>\n", add_special_tokens=False)
    spelled = [tokenizer.encode(c, add_special_tokens=False)[0] for c in "</think>"]
    marker = tokenizer.convert_tokens_to_ids("</think>")
    ids = [*tokenizer.encode("Hmm ", add_special_tokens=False), *spelled, marker]
    ids += tokenizer.encode(" Ok.", add_special_tokens=False)
    whole = parsing.whole(tokenizer.decode(ids), ids, prompt, {})
    assert (whole.reasoning, whole.content) == ("Hmm </think>", " Ok.")
    stream = parsing.stream(prompt, {})
    got = [stream.split(d) for d in deltas_of(tokenizer, ids, [1] * len(ids))]
    assert "".join(s for s, _, _ in got) == "Hmm </think>"
    assert "".join(a.text for _, _, a in got) == " Ok."


@pytest.mark.parametrize("parser", ["qwen3", "deepseek_r1"])
def test_text_held_back_behind_stop_strings_splits_at_the_marker(tokenizer, parser):
    """With a client's stop strings vLLM streams text behind its tokens (it holds back what
    may start one): the </think> token arrives before its text does."""
    from gateway.engine.reasoning_parsing import ReasoningParsing

    parsing = ReasoningParsing(parser, tokenizer)
    prompt = tokenizer.encode("<think>\n", add_special_tokens=False)
    written = f"{REASONING}</think>{ANSWER}"
    ids = tokenizer.encode(written, add_special_tokens=False)
    lag = 5  # characters each delta's text runs behind its tokens
    deltas, sent = [], 0
    for at in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:at])
        last = at == len(ids)
        upto = len(text) if last else max(sent, len(text) - lag)
        deltas.append(
            ChoiceDelta(0, text[sent:upto], [ids[at - 1]], None, "stop" if last else None)
        )
        sent = upto
    stream = parsing.stream(prompt, {})
    got = [stream.split(d) for d in deltas]
    assert "".join(s for s, _, _ in got) == REASONING
    assert "".join(a.text for _, _, a in got) == ANSWER
    assert stream.reasoning_tokens == len(ids) - len(
        tokenizer.encode(ANSWER, add_special_tokens=False)
    )


def test_a_forced_call_cut_while_reasoning_is_no_call_whole_or_streamed(demo_root, tokenizer):
    engine = TokenEngine(tokenizer, f'{REASONING}</think>{{"city":"Oslo"}}', finish="length")
    extra = {"tools": [WEATHER], "tool_choice": NAMED, "chat_template_kwargs": THINKING}
    with context(demo_root, engine) as (client, _, _):
        whole = chat(client, max_tokens=4, **extra).json()
        chunks = sse_chunks(chat(client, stream=True, max_tokens=4, **extra))
    choice = whole["choices"][0]
    assert choice["message"]["content"] is None and "tool_calls" not in choice["message"]
    assert choice["message"]["reasoning"] and choice["finish_reason"] == "length"
    assert not any(c["choices"][0]["delta"].get("tool_calls") for c in chunks if c["choices"])
