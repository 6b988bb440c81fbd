"""Structured outputs through the real engine (the session gateway: xgrammar, compact JSON),
driven by the official client: what a client asks for is what every adapter's output is, and
constraints only the engine's grammar backend can judge are a 400 naming the field. Outputs
equal to each adapter's constrained reference in mixed batches: test_fidelity.py."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from gateway.demo import DEMO_ADAPTERS
from tests.conftest import BASE_NAME, bearer

pytestmark = pytest.mark.engine
MODELS = [BASE_NAME, *(spec.name for spec in DEMO_ADAPTERS)]
MESSAGES = [{"role": "user", "content": "Is the adapter ready?"}]
VERDICT = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "enum": ["yes", "no"]},
        "confidence": {"type": "string", "enum": ["low", "medium", "high"]},
        "ready": {"type": "boolean"},
    },
    "required": ["answer", "confidence", "ready"],
    "additionalProperties": False,
}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT}}


def is_verdict(text: str) -> bool:
    value = json.loads(text)
    return (
        set(value) == {"answer", "confidence", "ready"}
        and value["answer"] in ("yes", "no")
        and value["confidence"] in ("low", "medium", "high")
        and isinstance(value["ready"], bool)
    )


async def test_every_model_answers_in_the_schema_in_one_mixed_batch(aclient):
    async def one(model: str, constrained: bool):
        extra = {"response_format": SCHEMA_FORMAT} if constrained else {}
        return await aclient.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=64, temperature=0, **extra
        )

    jobs = [(model, constrained) for model in MODELS for constrained in (True, False)]
    answers = await asyncio.gather(*(one(*job) for job in jobs))
    for (model, constrained), answer in zip(jobs, answers, strict=True):
        choice = answer.choices[0]
        if constrained:
            assert choice.finish_reason == "stop", (model, choice)
            assert is_verdict(choice.message.content), (model, choice.message.content)
        else:  # the same request unconstrained: the random demo weights write no JSON
            with pytest.raises(ValueError):
                json.loads(choice.message.content)


async def test_a_streamed_schema_answer_is_whole_json_and_sampling_stays_inside(aclient):
    stream = await aclient.chat.completions.create(
        model="demo-all-r16",
        messages=MESSAGES,
        max_tokens=64,
        temperature=0,
        stream=True,
        response_format=SCHEMA_FORMAT,
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert is_verdict(text), text
    sampled = await aclient.chat.completions.create(
        model="demo-qv-rs32",
        messages=MESSAGES,
        max_tokens=64,
        temperature=1.5,
        n=4,
        seed=7,
        response_format=SCHEMA_FORMAT,
    )
    assert all(is_verdict(c.message.content) for c in sampled.choices), sampled.choices


async def test_json_object_choice_and_grammar_on_both_routes(aclient):
    chat = await aclient.chat.completions.create(
        model=BASE_NAME,
        messages=MESSAGES,
        max_tokens=64,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(chat.choices[0].message.content), dict)
    picked = await aclient.completions.create(
        model="demo-mlp-r4",
        prompt="The colour is",
        max_tokens=8,
        temperature=1.0,
        n=6,
        seed=3,
        extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}},
    )
    assert {c.text for c in picked.choices} <= {"red", "green", "blue"}
    grammar = await aclient.completions.create(
        model="demo-qkvo-r8",
        prompt="Two letters:",
        max_tokens=8,
        temperature=0,
        extra_body={"structured_outputs": {"grammar": 'root ::= ("a" | "b") ("x" | "y")'}},
    )
    assert grammar.choices[0].text in {"ax", "ay", "bx", "by"}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (  # not JSON Schema: only the grammar backend knows
            {
                "response_format": {
                    **SCHEMA_FORMAT,
                    "json_schema": {"name": "v", "schema": {"type": "frobnicate"}},
                }
            },
            "response_format",
        ),
        ({"structured_outputs": {"regex": "(("}}, "structured_outputs"),
        ({"structured_outputs": {"grammar": "root ::= ((("}}, "structured_outputs"),
    ],
)
def test_a_constraint_the_backend_cannot_compile_is_a_400_naming_its_field(gateway, extra, param):
    response = httpx.post(
        f"{gateway.v1}/chat/completions",
        json={"model": "demo-qkvo-r8", "messages": MESSAGES, "max_tokens": 4, **extra},
        headers=bearer(gateway.api_key),
        timeout=60,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param), error
