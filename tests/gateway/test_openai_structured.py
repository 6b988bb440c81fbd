"""Structured outputs through the gateway's seams (scripted engine): what reaches the engine for
each way of asking (OpenAI's response_format, vLLM's structured_outputs, on both routes), and
every malformed or conflicting ask refused with a 400 naming its field before the engine sees
it. The real engine enforcing them: tests/e2e/test_structured_outputs.py."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from gateway.engine.client import ChoiceDelta, GenerationUpdate, OutputConstraint
from gateway.schemas.structured import MAX_CONSTRAINT_CHARS
from tests.gateway.fake_engine import (
    BASE,
    ScriptedEngine,
    built_demo_root,
    client_for,
    openai_context,
)

CHAT = [{"role": "user", "content": "hi"}]
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
    "required": ["answer"],
}
COMPACT = json.dumps(SCHEMA, separators=(",", ":"))


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return built_demo_root(tmp_path_factory, "structured")


@pytest.fixture(scope="module")
def ctx(demo_root):
    with openai_context(demo_root, ScriptedEngine(["a", "b", "c"] * 10)) as made:
        yield made


def chat(client, **extra):
    return client.post(
        "/v1/chat/completions", json={"model": BASE, "messages": CHAT, "max_tokens": 2, **extra}
    )


def sent_constraint(engine: ScriptedEngine) -> OutputConstraint | None:
    return engine.calls[-1][2].constraint


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"response_format": {"type": "text"}}, None),
        (
            {"response_format": {"type": "json_object"}},
            OutputConstraint("json_object", None, "response_format"),
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True},
                }
            },
            OutputConstraint("json", COMPACT, "response_format"),
        ),
        (
            {"structured_outputs": {"json": SCHEMA}},
            OutputConstraint("json", COMPACT, "structured_outputs"),
        ),
        (  # the schema as a JSON string, spelled loosely: one compact spelling reaches the engine
            {"structured_outputs": {"json": json.dumps(SCHEMA, indent=2)}},
            OutputConstraint("json", COMPACT, "structured_outputs"),
        ),
        (
            {"structured_outputs": {"regex": "[0-9]{3}"}},
            OutputConstraint("regex", "[0-9]{3}", "structured_outputs"),
        ),
        (
            {"structured_outputs": {"choice": ["red", "green"]}},
            OutputConstraint("choice", ("red", "green"), "structured_outputs"),
        ),
        (
            {"structured_outputs": {"grammar": 'root ::= "a" | "b"'}},
            OutputConstraint("grammar", 'root ::= "a" | "b"', "structured_outputs"),
        ),
        (
            {"structured_outputs": {"json_object": True}},
            OutputConstraint("json_object", None, "structured_outputs"),
        ),
        (  # text and a vLLM constraint: the constraint
            {"response_format": {"type": "text"}, "structured_outputs": {"regex": "a"}},
            OutputConstraint("regex", "a", "structured_outputs"),
        ),
    ],
)
def test_each_way_of_asking_reaches_the_engine_as_one_constraint(ctx, extra, expected):
    client, _, engine = ctx
    response = chat(client, **extra)
    assert response.status_code == 200, response.text
    assert sent_constraint(engine) == expected


def test_the_openai_client_asks_for_a_schema_on_both_routes(ctx):
    _, sdk, engine = ctx
    response_format = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}
    sdk.chat.completions.create(
        model=BASE, messages=CHAT, max_tokens=2, response_format=response_format
    )
    assert sent_constraint(engine) == OutputConstraint("json", COMPACT, "response_format")
    sdk.completions.create(
        model=BASE,
        prompt="x",
        max_tokens=2,
        extra_body={"structured_outputs": {"choice": ["a", "b"]}},
    )
    assert sent_constraint(engine) == OutputConstraint("choice", ("a", "b"), "structured_outputs")


LARGE = "a" * (MAX_CONSTRAINT_CHARS + 1)
LARGE_SCHEMA = {"type": "object", "description": LARGE}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
            "response_format.json_schema.name",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "has space", "schema": SCHEMA},
                }
            },
            "response_format.json_schema.name",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}},
            "response_format.json_schema.schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "a", "schema": []},
                }
            },
            "response_format.json_schema.schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "a", "schema": LARGE_SCHEMA},
                }
            },
            "response_format.json_schema.schema",
        ),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"structured_outputs": {"choice": [LARGE]}}, "structured_outputs.choice"),
        (  # each choice is a branch of the grammar, however short (measured: seconds each)
            {"structured_outputs": {"choice": [""] * MAX_CONSTRAINT_CHARS}},
            "structured_outputs.choice",
        ),
        (  # nested deeper than Python's JSON decoder goes (was a 500)
            {"structured_outputs": {"json": "[" * 5000 + "]" * 5000}},
            "structured_outputs.json",
        ),
        (  # the schema under its attribute's name, not the wire's: no schema
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "a", "json_schema": SCHEMA},
                }
            },
            "response_format.json_schema.schema",
        ),
        ({"structured_outputs": {"grammar": ""}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"regex": LARGE}}, "structured_outputs.regex"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
        ({"structured_outputs": {"json": "[1]"}}, "structured_outputs.json"),
        ({"structured_outputs": {"json": LARGE_SCHEMA}}, "structured_outputs.json"),
        ({"structured_outputs": {"json_object": False}}, "structured_outputs.json_object"),
        (  # engine-wide in vLLM 0.32: refused, not silently ignored
            {"structured_outputs": {"regex": "a", "disable_any_whitespace": True}},
            "structured_outputs.disable_any_whitespace",
        ),
        (
            {
                "response_format": {"type": "json_object"},
                "structured_outputs": {"regex": "a"},
            },
            "structured_outputs",
        ),
        (  # measured: vLLM generated free text after the constrained part
            {"response_format": {"type": "json_object"}, "ignore_eos": True},
            "ignore_eos",
        ),
        (  # measured: vLLM ignored it once the constraint ended the output
            {"structured_outputs": {"choice": ["a"]}, "min_tokens": 2},
            "min_tokens",
        ),
    ],
)
def test_a_malformed_or_conflicting_constraint_is_a_400_before_the_engine(ctx, extra, param):
    client, _, engine = ctx
    before = len(engine.calls)
    response = chat(client, **extra)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert len(engine.calls) == before


class FailingEngine(ScriptedEngine):
    """Ends every request as vLLM ends one it failed: finish_reason "error", after `tokens`
    tokens (vLLM 0.32 fails a request whose grammar did not compile before its first)."""

    def __init__(self, tokens: int):
        super().__init__(["a", "b", "c"])
        self.tokens = tokens

    async def generate(self, request_id, prompt_token_ids, options, adapter) -> AsyncIterator:
        self.calls.append((request_id, adapter, options))
        for i in range(self.tokens):
            delta = ChoiceDelta(index=0, text=self.words[i], token_ids=[i])
            yield GenerationUpdate(prompt_tokens=len(prompt_token_ids), choices=[delta])
        yield GenerationUpdate(
            prompt_tokens=len(prompt_token_ids),
            choices=[ChoiceDelta(index=0, text="", token_ids=[], finish_reason="error")],
            finished=True,
        )


def requests_counted(tenant: str, status: int) -> float:
    from prometheus_client import REGISTRY

    labels = {"tenant": tenant, "adapter": "", "version": "", "route": "chat"}
    return (
        REGISTRY.get_sample_value("loraplex_requests_total", {**labels, "status": str(status)})
        or 0.0
    )


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("tokens", "extra", "status", "param"),
    [
        (0, {"response_format": {"type": "json_object"}}, 400, "response_format"),
        (0, {"structured_outputs": {"regex": "a"}}, 400, "structured_outputs"),
        (0, {}, 500, None),  # no constraint: the engine's failure
        (2, {}, 500, None),
        # Reached a point where the grammar allows no token (measured: a regex no text
        # matches, `root ::= root`): the client's constraint, never the version's failure.
        (2, {"structured_outputs": {"regex": "a+"}}, 400, "structured_outputs"),
    ],
)
def test_a_request_the_engine_ended_in_error_is_never_a_200(
    demo_root, tokens, extra, status, param, stream
):
    with openai_context(demo_root, FailingEngine(tokens)) as (client, _, _):
        response = chat(client, stream=stream, **extra)
        tenant = client.tenant
    if stream and tokens:  # the 200 went out with the first token: the stream ends in error
        assert response.status_code == 200
        error = json.loads(response.text.split("data: ")[-2])["error"]
        assert error["param"] == param and ("invalid_request" in error["type"]) == (status == 400)
        assert '"finish_reason":"error"' not in response.text
        # Counted with the error's status, not as a client that left (499).
        assert requests_counted(tenant, status) == 1, status
        return
    assert response.status_code == status, response.text  # was a 200, finish_reason "error"
    assert response.json()["error"]["param"] == param


class StoppingEngine(ScriptedEngine):
    """Ends every choice with finish_reason "stop" and the given stop_reason (vLLM's: the stop
    string or token id that matched; None for the end-of-sequence)."""

    def __init__(self, stop_reason):
        super().__init__(["a"])
        self.stop_reason = stop_reason

    async def generate(self, request_id, prompt_token_ids, options, adapter) -> AsyncIterator:
        self.calls.append((request_id, adapter, options))
        delta = ChoiceDelta(
            index=0, text="a", token_ids=[7], finish_reason="stop", stop_reason=self.stop_reason
        )
        yield GenerationUpdate(prompt_tokens=len(prompt_token_ids), choices=[delta], finished=True)


def constrained_count(tenant: str, kind: str, ended: str) -> float:
    from prometheus_client import REGISTRY

    labels = {"tenant": tenant, "adapter": "", "version": "", "kind": kind, "ended": ended}
    return REGISTRY.get_sample_value("loraplex_constrained_outputs_total", labels) or 0.0


def test_constrained_sequences_are_counted_by_how_they_ended(ctx):
    """A constrained output cut by max_tokens does not match its constraint: operators see
    how many, per version and kind (loraplex_constrained_outputs_total)."""
    client, _, _ = ctx
    before = constrained_count(client.tenant, "regex", "max_tokens")
    assert chat(client, n=3, temperature=1, structured_outputs={"regex": "a+"}).is_success
    assert chat(client).is_success  # unconstrained: not counted
    assert constrained_count(client.tenant, "regex", "max_tokens") == before + 3


@pytest.mark.parametrize(
    ("backend", "stop_reason", "extra", "ended"),
    [
        # The end-of-sequence: the grammar allowed it, the text is whole.
        ("xgrammar", None, {}, "complete"),
        ("xgrammar", "a", {"stop": ["a"]}, "stop_sequence"),  # the client's stop string cut it
        # xgrammar allows a stop token only where the text may end: vLLM hands stop tokens to
        # it as its end (measured: 653 stop tokens, the JSON came out whole). guidance does
        # not (measured: ',' allowed after '[1' as a client stop token).
        ("xgrammar", 5, {"stop_token_ids": [5]}, "complete"),
        ("guidance", 5, {"stop_token_ids": [5]}, "stop_sequence"),
        ("guidance", 9, {}, "complete"),  # a stop token of the model's (generation_config)
    ],
)
def test_a_constrained_output_a_stop_sequence_cut_is_not_counted_complete(
    demo_root, backend, stop_reason, extra, ended
):
    engine = StoppingEngine(stop_reason)
    with client_for(demo_root, engine, structured_outputs_backend=backend) as client:
        response = chat(client, structured_outputs={"choice": ["a", "b"]}, **extra)
        assert response.status_code == 200, response.text
        assert constrained_count(client.tenant, "choice", ended) == 1
