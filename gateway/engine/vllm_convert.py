"""Translation between the gateway's engine types and vLLM's: adapter handles to LoRA requests,
sampling options to SamplingParams, request outputs to GenerationUpdates (vLLM imported lazily,
so the gateway's modules import without it)."""

from __future__ import annotations

import math
import time
from typing import Any

from gateway.engine.client import (
    AdapterHandle,
    ChoiceDelta,
    GenerationUpdate,
    OutputConstraint,
    SamplingOptions,
    TokenLogprob,
)

# What building or encoding a request raises for values vLLM cannot take (an int beyond
# int64 fails msgpack with OverflowError): the client's request, refused, not an engine fault.
REJECTED_ERRORS = (ValueError, OverflowError, TypeError)
# Where vLLM 0.32 checks a request's structured-output constraint (SamplingParams.verify
# compiles its grammar): an error raised in there is about the constraint.
STRUCTURED_CHECKS = frozenset({"_validate_structured_outputs"})


def raised_in(exc: BaseException, functions: frozenset[str]) -> bool:
    """Whether `exc` was raised inside a function of one of these names (its traceback)."""
    frame = exc.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code.co_name in functions:
            return True
        frame = frame.tb_next
    return False


def lora_request(adapter: AdapterHandle | None) -> Any:
    if adapter is None:
        return None
    from vllm.lora.request import LoRARequest

    return LoRARequest(adapter.engine_name, adapter.engine_id, adapter.path)


# Options whose None means vLLM's own default, which SamplingParams takes only as no argument.
_LEFT_TO_VLLM = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)


def sampling_params(options: SamplingOptions) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    kwargs: dict[str, Any] = {
        "n": options.n,
        "max_tokens": options.max_tokens,
        "seed": options.seed,
        "stop": list(options.stop) or None,
        "stop_token_ids": list(options.stop_token_ids) or None,
        "min_tokens": options.min_tokens,
        "logprobs": options.logprobs,
        "logit_bias": dict(options.logit_bias) or None,
        "ignore_eos": options.ignore_eos,
        "skip_special_tokens": options.skip_special_tokens,
        "output_kind": RequestOutputKind.DELTA if options.stream else RequestOutputKind.FINAL_ONLY,
    }
    for name in _LEFT_TO_VLLM:
        value = getattr(options, name)
        if value is not None:
            kwargs[name] = value
    if options.constraint is not None:
        kwargs["structured_outputs"] = structured_outputs(options.constraint)
    if options.echo_logprobs is not None:
        kwargs["prompt_logprobs"] = options.echo_logprobs
    elif options.prompt_logprobs:
        kwargs["prompt_logprobs"] = 0  # the prompt's own tokens only
    if options.loop_guard is not None:
        from vllm.sampling_params import RepetitionDetectionParams

        guard = options.loop_guard
        kwargs["repetition_detection"] = RepetitionDetectionParams(
            max_pattern_size=guard.max_pattern,
            min_pattern_size=guard.min_pattern,
            min_count=guard.min_count,
        )
    return SamplingParams(**kwargs)


def structured_outputs(constraint: OutputConstraint) -> Any:
    from vllm.sampling_params import StructuredOutputsParams

    spec = constraint.spec
    if constraint.kind == "choice":
        return StructuredOutputsParams(choice=list(spec or ()))
    if constraint.kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    assert isinstance(spec, str), f"a {constraint.kind} constraint is text, got {spec!r}"
    if constraint.kind == "json":
        return StructuredOutputsParams(json=spec)
    if constraint.kind == "regex":
        return StructuredOutputsParams(regex=spec)
    if constraint.kind == "structural_tag":
        return StructuredOutputsParams(structural_tag=spec)
    return StructuredOutputsParams(grammar=spec)


def _entry(position: Any, token_id: int, top_k: int) -> TokenLogprob:
    """vLLM gives per position the k best tokens plus the chosen one (which may rank lower)."""
    chosen = position[token_id]
    ranked = sorted(position.values(), key=lambda lp: lp.rank or 0)[:top_k]
    return TokenLogprob(
        token=chosen.decoded_token or "",
        # -inf is not valid JSON; OpenAI clamps the same way.
        logprob=max(chosen.logprob, -9999.0),
        top=tuple((lp.decoded_token or "", max(lp.logprob, -9999.0)) for lp in ranked),
    )


def _logprobs(output: Any, top_k: int | None) -> list[TokenLogprob] | None:
    if output.logprobs is None or top_k is None:
        return None
    return [
        _entry(position, token_id, top_k)
        for token_id, position in zip(output.token_ids, output.logprobs, strict=False)
    ]


def _prompt_logprobs(output: Any, top_k: int | None) -> list[TokenLogprob | None] | None:
    """One entry per prompt token; None where vLLM scores none (its first)."""
    positions = getattr(output, "prompt_logprobs", None)
    if top_k is None or positions is None:
        return None
    return [
        _entry(position, token_id, top_k) if position and token_id in position else None
        for token_id, position in zip(output.prompt_token_ids, positions, strict=False)
    ]


def generation_update(
    output: Any, prompt_tokens: int, options: SamplingOptions
) -> GenerationUpdate:
    top_k = options.logprobs
    choices = [
        ChoiceDelta(
            index=completion.index,
            text=completion.text,
            token_ids=list(completion.token_ids),
            logprobs=_logprobs(completion, top_k),
            finish_reason=completion.finish_reason,
            stop_reason=completion.stop_reason if completion.finish_reason else None,
        )
        for completion in output.outputs
    ]
    return GenerationUpdate(
        prompt_tokens=prompt_tokens,
        choices=choices,
        finished=output.finished,
        cached_prompt_tokens=output.num_cached_tokens,
        first_token_at=_first_token_at(getattr(output, "metrics", None)),
        # Only when drift sampled the request (never an echo: an eval harness's, no traffic).
        prompt_surprisal=_surprisal(output) if options.prompt_logprobs else None,
        prompt_logprobs=_prompt_logprobs(output, options.echo_logprobs),
    )


def _surprisal(output: Any) -> tuple[float, int] | None:
    """vLLM's prompt logprobs: None for the first position, then per position a dict that holds
    the prompt's own token (with prompt_logprobs=0, only it)."""
    positions = getattr(output, "prompt_logprobs", None)
    token_ids = getattr(output, "prompt_token_ids", None)
    if not positions or not token_ids:
        return None
    total, count = 0.0, 0
    for token_id, position in zip(token_ids, positions, strict=False):
        entry = position.get(token_id) if position else None
        if entry is None or not math.isfinite(entry.logprob):
            continue
        total -= entry.logprob
        count += 1
    return (total, count) if count else None


def _first_token_at(stats: Any) -> float | None:
    """When vLLM made the request's first token, as a time.perf_counter() reading.

    vLLM's RequestStateStats (RequestOutput.metrics, kept while it logs stats, its default)
    times the first token from the request's arrival, both wall clock; it is set even for
    FINAL_ONLY requests, whose one output comes at their end."""
    arrival = getattr(stats, "arrival_time", 0.0)
    latency = getattr(stats, "first_token_latency", 0.0)
    if not arrival or not latency:
        return None
    return time.perf_counter() - max(0.0, time.time() - (arrival + latency))
