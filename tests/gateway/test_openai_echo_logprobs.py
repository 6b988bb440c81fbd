"""A completion's echo with logprobs, as eval harnesses score answers (lm-evaluation-harness's
`local-completions`: token-id prompt, echo, logprobs, max_tokens 1): the prompt's tokens come
first with their logprobs (the first with none, decoded by the gateway), then the completion's,
offsets counted from the prompt's start, each position's alternatives with its own token as
vLLM's server gives them; each prompt gets its own prompt's; the engine is asked for prompt
logprobs only then (a shadow copy never: tests/gateway/test_shadow); streaming it, n > 1 and
more prompt tokens than the limit are refused. The real engine's numbers are held to HF
transformers in tests/e2e/test_openai_api."""

from __future__ import annotations

from types import SimpleNamespace

import openai
import pytest
from transformers import AutoTokenizer

from gateway.engine.client import SamplingOptions, TokenLogprob
from gateway.engine.vllm_convert import generation_update, sampling_params
from tests.gateway.fake_engine import BASE, ScriptedEngine, built_demo_root, openai_context


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return built_demo_root(tmp_path_factory, "echo")


@pytest.fixture(scope="module")
def tokenizer(demo_root):
    return AutoTokenizer.from_pretrained(demo_root / "base")


@pytest.fixture(scope="module")
def ctx(demo_root):
    engine = ScriptedEngine(["a", "b", "c"])
    engine.scripted_logprobs = True
    with openai_context(demo_root, engine, echo_logprobs_max_prompt_tokens=12) as made:
        yield made


def test_the_prompts_tokens_come_first_then_the_completions(ctx, tokenizer):
    client, _, engine = ctx
    ids = [5, 17, 42, 99]
    body = {"model": BASE, "prompt": ids, "max_tokens": 1, "logprobs": 2, "echo": True}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert engine.calls[-1][2].echo_logprobs == 2
    choice = response.json()["choices"][0]
    logprobs = choice["logprobs"]
    first = tokenizer.decode([5])
    assert logprobs["tokens"] == [first, "<17>", "<42>", "<99>", "a"]
    assert logprobs["token_logprobs"] == [None, -0.1, -0.2, -0.3, -0.5]
    alternatives = {"alt0": -1.0, "alt1": -2.0}
    assert logprobs["top_logprobs"] == [None] + [
        alternatives | {token: lp}
        for token, lp in zip(logprobs["tokens"][1:], logprobs["token_logprobs"][1:], strict=True)
    ]
    lengths = [len(first), 4, 4, 4]
    assert logprobs["text_offset"] == [0, *(sum(lengths[:i]) for i in range(1, 5))]
    assert choice["text"] == tokenizer.decode(ids, skip_special_tokens=True) + "a"


def test_each_prompt_gets_its_own_prompts_logprobs(ctx):
    client, _, _ = ctx
    body = {
        "model": BASE,
        "prompt": [[1, 7, 8], [1, 9]],
        "max_tokens": 2,
        "logprobs": 0,
        "echo": True,
        "temperature": 0,
    }
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    choices = sorted(response.json()["choices"], key=lambda c: c["index"])
    tokens = [c["logprobs"]["tokens"][1:] for c in choices]
    assert tokens == [["<7>", "<8>", "a", "b"], ["<9>", "a", "b"]]
    assert choices[0]["logprobs"]["top_logprobs"][1:] == [
        {"<7>": -0.1},
        {"<8>": -0.2},
        {"a": -0.5},
        {"b": -0.5},
    ]


def test_without_echo_or_logprobs_the_engine_is_not_asked_for_prompt_logprobs(ctx):
    client, _, engine = ctx
    for extra in ({"echo": True}, {"logprobs": 1}, {"echo": False, "logprobs": 1}):
        body = {"model": BASE, "prompt": "hi", "max_tokens": 1, **extra}
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        assert engine.calls[-1][2].echo_logprobs is None
        logprobs = response.json()["choices"][0]["logprobs"]
        assert logprobs is None or None not in logprobs["token_logprobs"]


def test_streaming_it_n_above_1_or_prompts_over_the_limit_are_refused(ctx):
    _, sdk, engine = ctx
    before = len(engine.calls)
    with pytest.raises(openai.BadRequestError) as streamed:
        sdk.completions.create(
            model=BASE, prompt=[1, 2], max_tokens=1, logprobs=1, echo=True, stream=True
        )
    assert streamed.value.body["param"] == "stream"
    with pytest.raises(openai.BadRequestError) as many:
        sdk.completions.create(
            model=BASE, prompt=[1, 2], max_tokens=1, logprobs=1, echo=True, n=2, temperature=0
        )
    assert many.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as together:  # 7 + 6 tokens over two prompts
        sdk.completions.create(
            model=BASE,
            prompt=[list(range(1, 8)), list(range(1, 7))],
            max_tokens=1,
            logprobs=1,
            echo=True,
        )
    assert "at most 12 prompt tokens per request" in together.value.body["message"]
    with pytest.raises(openai.BadRequestError) as long:
        sdk.completions.create(
            model=BASE, prompt=list(range(1, 14)), max_tokens=1, logprobs=1, echo=True
        )
    assert long.value.body["param"] == "prompt"
    assert "this one has 13" in long.value.body["message"]
    assert len(engine.calls) == before
    ok = sdk.completions.create(
        model=BASE, prompt=list(range(1, 13)), max_tokens=1, logprobs=1, echo=True
    )
    assert len(ok.choices[0].logprobs.tokens) == 13


def logprob(value: float, rank: int, text: str) -> SimpleNamespace:
    return SimpleNamespace(logprob=value, rank=rank, decoded_token=text)


def test_vllms_prompt_logprobs_become_the_updates_and_drift_reads_only_its_own():
    output = SimpleNamespace(
        outputs=[],
        finished=True,
        num_cached_tokens=0,
        prompt_token_ids=[1, 5, 6],
        prompt_logprobs=[
            None,
            {5: logprob(-0.5, 2, " five"), 9: logprob(-0.1, 1, " nine")},
            {6: logprob(float("-inf"), 3, " six"), 7: logprob(-0.2, 1, " seven")},
        ],
    )
    echo = generation_update(output, 3, SamplingOptions(max_tokens=1, echo_logprobs=1))
    assert echo.prompt_logprobs == [
        None,
        TokenLogprob(" five", -0.5, ((" nine", -0.1),)),
        TokenLogprob(" six", -9999.0, ((" seven", -0.2),)),
    ]
    assert echo.prompt_surprisal is None  # an eval harness's prompts are no drift sample
    sampled = generation_update(output, 3, SamplingOptions(max_tokens=1, prompt_logprobs=True))
    assert sampled.prompt_logprobs is None and sampled.prompt_surprisal == (0.5, 1)
    both = SamplingOptions(max_tokens=1, prompt_logprobs=True, echo_logprobs=3)
    assert sampling_params(both).prompt_logprobs == 3
    assert sampling_params(SamplingOptions(max_tokens=1, prompt_logprobs=True)).prompt_logprobs == 0
    assert sampling_params(SamplingOptions(max_tokens=1)).prompt_logprobs is None
