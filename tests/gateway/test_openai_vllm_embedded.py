"""The embedded-vLLM client's translation both ways, against vLLM's own classes (no engine
started): sampling options in, request outputs and failures out."""

from __future__ import annotations

import time

import pytest
from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine import EngineCoreOutput, EngineCoreRequest, FinishReason
from vllm.v1.engine.exceptions import EngineGenerateError
from vllm.v1.engine.output_processor import OutputProcessor, RequestOutputCollector
from vllm.v1.metrics.stats import IterationStats
from vllm.v1.serial_utils import MsgpackEncoder

from gateway.engine.client import EngineError, EngineRejected, OutputConstraint, SamplingOptions
from gateway.engine.vllm_convert import generation_update as _update
from gateway.engine.vllm_convert import sampling_params as _sampling_params
from gateway.engine.vllm_embedded import EmbeddedVLLM
from gateway.settings import Settings

INT64_MAX = 2**63 - 1


def test_the_largest_seed_the_gateway_takes_is_one_vllm_can_encode_for_its_engine_core():
    MsgpackEncoder().encode(_sampling_params(SamplingOptions(max_tokens=1, seed=INT64_MAX)))
    with pytest.raises(OverflowError):  # what an unbounded seed met inside AsyncLLM
        MsgpackEncoder().encode(_sampling_params(SamplingOptions(max_tokens=1, seed=2**64)))


def test_vllm_gets_the_logit_bias():
    params = _sampling_params(SamplingOptions(max_tokens=1, logit_bias=((5, -100.0),)))
    assert params.logit_bias == {5: -100.0}
    assert _sampling_params(SamplingOptions(max_tokens=1)).logit_bias is None


def test_vllm_gets_every_sampling_option_the_gateway_resolved():
    options = SamplingOptions(
        max_tokens=4,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        min_p=0.05,
        repetition_penalty=1.05,
        min_tokens=2,
        stop_token_ids=(5, 9),
    )
    params = _sampling_params(options)
    assert (params.temperature, params.top_p, params.top_k) == (0.7, 0.8, 20)
    assert (params.min_p, params.repetition_penalty, params.min_tokens) == (0.05, 1.05, 2)
    assert params.stop_token_ids == [5, 9]
    MsgpackEncoder().encode(params)  # as it crosses to the engine core


def test_options_left_unset_are_vllms_defaults():
    params = _sampling_params(SamplingOptions(max_tokens=4))
    neutral = SamplingParams(max_tokens=4)
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "min_tokens"):
        assert getattr(params, name) == getattr(neutral, name), name
    assert params.stop_token_ids == []


async def test_the_field_vllms_validation_names_is_the_rejections_param():
    # What the gateway never sends but vLLM refuses itself: its VLLMValidationError names it.
    client = EmbeddedVLLM(Settings(), "unused", "base")
    client._engine = FailingAsyncLLM(ValueError("unused"))  # type: ignore[assignment]
    with pytest.raises(EngineRejected) as caught:
        async for _ in client.generate("r", [1], SamplingOptions(max_tokens=1, top_p=5.0), None):
            pass
    assert caught.value.param == "top_p"
    with pytest.raises(EngineRejected) as caught:
        await drain(FailingAsyncLLM(ValueError("v")))
    assert caught.value.param is None


class FailingAsyncLLM:
    """Stands in for AsyncLLM.generate failing the way it wraps any error: adding the request
    (encoding it for the engine core included), or, with `after_output`, later."""

    errored = False

    def __init__(self, cause: Exception, after_output: bool = False):
        self.cause = cause
        self.after_output = after_output

    async def generate(self, prompt, params, request_id, lora_request=None):
        if self.after_output:
            yield run_final_only(delay_s=0.0)[0]
        raise EngineGenerateError() from self.cause


async def drain(engine: FailingAsyncLLM) -> None:
    client = EmbeddedVLLM(Settings(), "unused", "base")
    client._engine = engine  # type: ignore[assignment]
    async for _ in client.generate("r", [1, 2], SamplingOptions(max_tokens=3), None):
        pass


@pytest.mark.parametrize("cause", [OverflowError("int too big"), TypeError("t"), ValueError("v")])
async def test_vllm_failing_to_take_the_request_is_a_rejection_not_an_engine_fault(cause):
    # A 400 for the client, and no failure counted against the adapter version (it was 500).
    with pytest.raises(EngineRejected, match=str(cause)):
        await drain(FailingAsyncLLM(cause))
    # Once the engine produced output, the same failure is the engine's.
    with pytest.raises(EngineError):
        await drain(FailingAsyncLLM(cause, after_output=True))


def run_final_only(delay_s: float) -> tuple[object, float]:
    """One request through vLLM's OutputProcessor (what AsyncLLM turns engine-core outputs
    into RequestOutputs with), non-streamed (FINAL_ONLY): 3 tokens `delay_s` apart. Returns
    its one output and the perf_counter time of its first token."""
    params = SamplingParams(
        max_tokens=3, output_kind=RequestOutputKind.FINAL_ONLY, detokenize=False
    )
    processor = OutputProcessor(None, log_stats=True)  # AsyncLLM logs stats by default
    request = EngineCoreRequest(
        request_id="r",
        prompt_token_ids=[1, 2],
        mm_features=None,
        sampling_params=params,
        pooling_params=None,
        arrival_time=time.time(),
        lora_request=None,
        cache_salt=None,
        data_parallel_rank=None,
        external_req_id="r",
    )
    queue = RequestOutputCollector(RequestOutputKind.FINAL_ONLY, "r")
    processor.add_request(request, None, queue=queue)
    time.sleep(delay_s)  # queued and prefilling
    first = time.perf_counter()
    result = None
    for i in range(3):
        last = i == 2
        output = EngineCoreOutput(
            request_id="r",
            new_token_ids=[5 + i],
            finish_reason=FinishReason.LENGTH if last else None,
        )
        processor.process_outputs([output], time.monotonic(), IterationStats())
        result = queue.get_nowait()
        assert (result is None) is not last  # FINAL_ONLY: nothing until the end
        if not last:
            time.sleep(delay_s)
    return result, first


def test_a_non_streamed_output_carries_when_vllm_made_its_first_token():
    output, first = run_final_only(delay_s=0.2)
    update = _update(output, 2, SamplingOptions(max_tokens=2))
    assert update.finished and len(update.choices[0].token_ids) == 3
    assert update.first_token_at is not None
    # The first token came 0.4 s before this (only) update: TTFT must not include that.
    assert abs(update.first_token_at - first) < 0.05


def test_the_embedded_engine_keeps_the_request_stats_first_token_times_come_from():
    args = EmbeddedVLLM(Settings(), "unused", "base")._engine_args()
    assert args.disable_log_stats is False


class RecordingAsyncLLM:
    """Records what AsyncLLM.generate was given beside the prompt and parameters."""

    errored = False

    def __init__(self) -> None:
        self.extra: list[dict] = []

    async def generate(self, prompt, params, request_id, lora_request=None, **extra):
        self.extra.append(extra)
        yield run_final_only(delay_s=0.0)[0]


@pytest.mark.parametrize(
    ("parser", "ended", "constrained", "expected"),
    [
        # Without a reasoning parser vLLM is called as before, whatever the options say.
        ("", None, True, {}),
        ("", False, True, {}),
        # A completion (None): constrained from the first token, not left to the engine's
        # reading of the prompt, which held it back for a </think> that never came.
        ("qwen3", None, True, {"reasoning_ended": True}),
        ("qwen3", True, True, {"reasoning_ended": True}),
        (
            "qwen3",
            False,
            True,
            {
                "reasoning_ended": False,
                # The engine's own reasoner reads the switches too, as vLLM's server sends them.
                "reasoning_parser_kwargs": {"chat_template_kwargs": {"enable_thinking": True}},
            },
        ),
        ("qwen3", False, False, {}),  # nothing constrained: nothing to tell
    ],
)
async def test_the_engine_is_told_where_a_constraint_starts(parser, ended, constrained, expected):
    engine = RecordingAsyncLLM()
    client = EmbeddedVLLM(Settings(reasoning_parser=parser or None), "unused", "base")
    client._engine = engine  # type: ignore[assignment]
    options = SamplingOptions(
        max_tokens=3,
        constraint=OutputConstraint("json_object", None, "response_format")
        if constrained
        else None,
        reasoning_ended=ended,
        reasoning_switches={"enable_thinking": True},
    )
    async for _ in client.generate("r", [1, 2], options, None):
        pass
    assert engine.extra == [expected]
