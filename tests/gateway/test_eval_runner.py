"""The harness's client side: what it sends for chat and completion cases, how it treats rate
limits, refusals and unreachable gateways, and how it pins sentinels."""

from __future__ import annotations

import asyncio
import json

import httpx

from gateway.evals.gates import Generation, Run
from gateway.evals.runner import pin_sentinels, run_suite
from gateway.evals.suite import Suite

SUITE = Suite.model_validate(
    {
        "min_success": 0,
        "cases": [
            {
                "id": "chat",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 9,
                "checks": [{"type": "max_words", "limit": 2}],
            },
            {"id": "text", "prompt": "once", "temperature": 0.5, "sentinel": True},
        ],
    }
)


def answer(request: httpx.Request, body: dict) -> httpx.Response:
    if request.url.path == "/v1/chat/completions":
        choice = {
            "message": {"role": "assistant", "content": "hello there"},
            "finish_reason": "stop",
        }
        return httpx.Response(200, json={"id": f"chatcmpl-{body['model']}", "choices": [choice]})
    choice = {"text": " upon a time", "finish_reason": "length"}
    return httpx.Response(200, json={"id": f"cmpl-{body['model']}", "choices": [choice]})


def run(handler, suite: Suite = SUITE, baseline: str | None = None, repeat: int = 1):
    async def go():
        async with httpx.AsyncClient(
            transport=httpx.MockTransport(handler), base_url="http://gw"
        ) as client:
            return await run_suite(
                client, suite, model="m@2", baseline=baseline, repeat=repeat, concurrency=2
            )

    return asyncio.run(go())


def test_chat_and_completion_cases_are_sent_as_the_openai_routes_take_them():
    sent: list[tuple[str, dict]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        sent.append((request.url.path, body))
        return answer(request, body)

    report = run(handler, baseline="m", repeat=2)
    assert len(sent) == 8
    chat = next(body for path, body in sent if path == "/v1/chat/completions")
    assert chat == {
        "model": chat["model"],
        "max_tokens": 9,
        "temperature": 0.0,
        "seed": chat["seed"],
        "messages": [{"role": "user", "content": "hi"}],
    }
    # One seed per case and repeat, the same for the candidate and the baseline.
    seeds = {(b["model"], b.get("prompt", "chat"), b["seed"]) for _, b in sent}
    assert len({seed for _, _, seed in seeds}) == 4 and len(seeds) == 8
    text = next(body for path, body in sent if path == "/v1/completions")
    assert text["prompt"] == "once" and text["temperature"] == 0.5 and text["max_tokens"] == 128
    assert {b["model"] for _, b in sent} == {"m@2", "m"}
    assert [g.case for g in report.candidate.generations] == ["chat", "chat", "text", "text"]
    first = report.candidate.generations[0]
    assert first == Generation(
        case="chat", text="hello there", finish_reason="stop", response_id="chatcmpl-m@2"
    )
    assert report.baseline is not None and report.baseline.model == "m"
    assert report.passed and report.repeat == 2


def test_a_rate_limit_is_waited_out_and_other_refusals_are_the_answers_errors():
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        calls["n"] += 1
        if request.url.path == "/v1/completions" and calls["n"] <= 3:
            return httpx.Response(429, headers={"retry-after": "0"}, json={"error": {}})
        if request.url.path == "/v1/chat/completions":
            error = {"message": "adapter weights damaged", "code": "adapter_load_failed"}
            return httpx.Response(500, json={"error": error})
        return answer(request, body)

    report = run(handler)
    chat, text = report.candidate.generations
    assert chat.error == "500 adapter_load_failed: adapter weights damaged" and chat.text is None
    assert text.text == " upon a time" and text.error is None
    assert not report.passed and report.gates[0].name == "answered"


def test_an_unreachable_gateway_and_an_odd_answer_are_errors_not_crashes():
    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    report = run(unreachable)
    assert all(g.error and g.error.startswith("ConnectError") for g in report.candidate.generations)

    def odd(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"choices": []})

    report = run(odd)
    assert all("unexpected answer shape" in g.error for g in report.candidate.generations)

    def numbered(request: httpx.Request) -> httpx.Response:  # an id that is no string
        choice = {"text": "a", "message": {"content": "a"}, "finish_reason": "stop"}
        return httpx.Response(200, json={"id": 7, "choices": [choice]})

    report = run(numbered)
    assert all("unexpected answer shape" in g.error for g in report.candidate.generations)


def test_sentinels_are_pinned_to_a_steady_answer_only():
    run_ = Run(
        model="m",
        generations=[
            Generation(case="chat", text="a"),
            Generation(case="text", text=" upon a time\n"),
            Generation(case="text", text=" upon a time\n"),
        ],
    )
    pinned, unsteady = pin_sentinels(SUITE, run_)
    assert unsteady == []
    assert pinned.cases[0] == SUITE.cases[0]  # not a sentinel: left alone
    assert pinned.cases[1].pinned == "upon a time"
    again, _ = pin_sentinels(
        pinned, Run(model="m", generations=[Generation(case="text", text="x")])
    )
    assert again.cases[1].pinned == "upon a time"  # a pinned sentinel keeps its pin
    wavering = Run(
        model="m",
        generations=[Generation(case="text", text="a"), Generation(case="text", text="b")],
    )
    failed = Run(model="m", generations=[Generation(case="text", error="500")])
    for unsure in (wavering, failed):
        left, unsteady = pin_sentinels(SUITE, unsure)
        assert unsteady == ["text"] and left.cases[1].pinned is None
