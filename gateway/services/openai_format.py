"""OpenAI response bodies and SSE chunks for chat and text completions, byte-for-byte in shape."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

from gateway.engine.client import ChoiceDelta, GenerationUpdate, TokenLogprob
from gateway.errors import LoraplexError, typed_error_body, unexpected_error_body
from gateway.services import auto_tool_calls
from gateway.services.generation_job import ChoiceResult, GenerationJob
from gateway.services.prompts import EchoLogprob
from gateway.services.reasoning_output import ReasoningChunks, split_whole
from gateway.services.tool_calls import ToolCallStream, message_and_finish

logger = logging.getLogger(__name__)

# Async generators all the way down: closing the outermost (the response does, however it
# ends) closes each one inside it in turn, down to the engine request, which is aborted.
Updates = AsyncGenerator[tuple[int, GenerationUpdate]]

DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


def usage(
    job: GenerationJob, completion_tokens: int, reasoning_tokens: int | None = None
) -> dict[str, Any]:
    """`reasoning_tokens`: of the completion tokens, those of reasoning (with a reasoning
    parser, as vLLM's server reports them; None without)."""
    body: dict[str, Any] = {
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": job.prompt_tokens + completion_tokens,
    }
    cached = job.cached_prompt_tokens
    if cached is not None:
        body["prompt_tokens_details"] = {"cached_tokens": cached}
    if reasoning_tokens is not None:
        body["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return body


def _chat_logprobs(entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if entries is None:
        return None

    def item(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
            for e in entries
        ]
    }


def _completion_logprobs(entries: list[TokenLogprob] | None, offset: int) -> dict[str, Any] | None:
    if entries is None:
        return None
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        # The chosen token and the k best, as OpenAI's legacy API and vLLM's server give them.
        "top_logprobs": [dict(e.top) | {e.token: e.logprob} for e in entries],
        "text_offset": offsets,
    }


def _envelope(job: GenerationJob, object_name: str) -> dict[str, Any]:
    return {
        "id": job.request_id,
        "object": object_name,
        "created": job.created,
        "model": job.model,
        "system_fingerprint": None,
    }


def chat_completion_body(job: GenerationJob, choices: list[ChoiceResult]) -> dict[str, Any]:
    body_choices = []
    reasoning_tokens = 0
    for whole in choices:
        # The reasoning apart; the rest of the output (c) is read for calls as any answer.
        reasoning, c, reasoning_count, logprobs = split_whole(job, whole)
        reasoning_tokens += reasoning_count
        message: dict[str, Any] = {"role": "assistant", "content": c.text}
        finish_reason = c.finish_reason
        if job.forced_call is not None and (c is whole or c.text or c.logprobs):
            message, finish_reason = message_and_finish(job.forced_call, c.text, finish_reason)
        elif job.auto_calls is not None:
            plan = job.auto_calls
            parsed = auto_tool_calls.parse_whole(plan, c.text, c.token_ids)
            message, finish_reason = auto_tool_calls.message_and_finish(
                plan, parsed, c.text, finish_reason
            )
            job.judge_tool_calls(
                c.index,
                *auto_tool_calls.calls_to_judge(
                    plan, parsed, c.text, c.finish_reason, c.stop_reason, client_stops(job)
                ),
            )
        if c is not whole and message.get("content") == "":
            message["content"] = None  # all reasoning, no answer (as vLLM's server)
        if reasoning is not None:
            message["reasoning"] = reasoning
        body_choices.append(
            {
                "index": c.index,
                "message": message,
                "logprobs": _chat_logprobs(logprobs),
                "finish_reason": finish_reason,
            }
        )
    return {
        **_envelope(job, "chat.completion"),
        "choices": body_choices,
        "usage": usage(
            job,
            sum(len(c.token_ids) for c in choices),
            reasoning_tokens if job.reasoning is not None else None,
        ),
    }


def client_stops(job: GenerationJob) -> frozenset[str | int]:
    """The stop strings and token ids the client sent (vLLM reports the model's own
    end-of-sequence tokens as stop reasons too)."""
    return frozenset((*job.options.stop, *job.options.stop_token_ids))


def _echo_logprobs(prompt: list[EchoLogprob], entries: list[TokenLogprob] | None) -> dict[str, Any]:
    """The prompt's tokens then the completion's, offsets counted from the prompt's start (as
    vLLM's server does: the first token has no logprob and no alternatives)."""
    completion = _completion_logprobs(entries or [], sum(len(e.token) for e in prompt)) or {}
    offsets, offset = [], 0
    for entry in prompt:
        offsets.append(offset)
        offset += len(entry.token)
    return {
        "tokens": [e.token for e in prompt] + completion["tokens"],
        "token_logprobs": [e.logprob for e in prompt] + completion["token_logprobs"],
        "top_logprobs": [
            None if e.top is None or e.logprob is None else dict(e.top) | {e.token: e.logprob}
            for e in prompt
        ]
        + completion["top_logprobs"],
        "text_offset": offsets + completion["text_offset"],
    }


def completion_body(job: GenerationJob, choices: list[ChoiceResult]) -> dict[str, Any]:
    body_choices = []
    for c in choices:
        prefix = job.echo_texts[c.index // job.options.n] if job.echo_texts else ""
        logprobs = (
            _echo_logprobs(c.prompt_logprobs, c.logprobs)
            if c.prompt_logprobs is not None
            else _completion_logprobs(c.logprobs, len(prefix))
        )
        body_choices.append(
            {
                "index": c.index,
                "text": prefix + c.text,
                "logprobs": logprobs,
                "finish_reason": c.finish_reason,
            }
        )
    return {
        **_envelope(job, "text_completion"),
        "choices": body_choices,
        "usage": usage(job, sum(len(c.token_ids) for c in choices)),
    }


async def chat_stream(
    job: GenerationJob, updates: Updates, include_usage: bool, request_id: str
) -> AsyncGenerator[str]:
    """chat.completion.chunk events: role first, then reasoning and content deltas, finish,
    usage, [DONE]."""
    choice_count = len(job.prompts) * job.options.n
    reasoning = ReasoningChunks(job, job.reasoning) if job.reasoning is not None else None
    calls: ToolCallStream | auto_tool_calls.AutoCallStream | None = None
    if job.forced_call is not None:
        splits = job.reasoning is not None and job.reasoning.split
        calls = ToolCallStream(job.forced_call, opens_late=splits)
    elif job.auto_calls is not None:
        calls = auto_tool_calls.AutoCallStream(
            job.auto_calls,
            lambda index: job.prompts[index // job.options.n],
            job.judge_tool_calls,
            client_stops(job),
        )
    if calls is not None:
        opening = [_chat_choice(index, calls.opening(index)) for index in range(choice_count)]
        choices_of = _call_choices(calls)
    else:
        opening = [
            _chat_choice(index, {"role": "assistant", "content": ""})
            for index in range(choice_count)
        ]
        choices_of = _content_choices
    async with aclosing(
        _event_stream(
            job,
            updates,
            include_usage,
            request_id,
            "chat.completion.chunk",
            opening,
            _reasoning_first(reasoning, choices_of),
            reasoning,
        )
    ) as events:
        async for event in events:
            yield event


def _call_choices(calls: ToolCallStream | auto_tool_calls.AutoCallStream) -> ChoicesOf:
    def call_choices_of(index: int, delta: ChoiceDelta) -> list[dict[str, Any]]:
        choices = []
        for body, logprobs, finish_reason in calls.deltas(index, delta):
            choice = _chat_choice(index, body, finish_reason=finish_reason)
            choice["logprobs"] = _chat_logprobs(logprobs)
            choices.append(choice)
        return choices

    return call_choices_of


def _content_choices(index: int, delta: ChoiceDelta) -> list[dict[str, Any]]:
    choices = []
    if delta.text or delta.logprobs:
        choice = _chat_choice(index, {"content": delta.text})
        choice["logprobs"] = _chat_logprobs(delta.logprobs)
        choices.append(choice)
    if delta.finish_reason:
        choices.append(_chat_choice(index, {}, finish_reason=delta.finish_reason))
    return choices


ChoicesOf = Callable[[int, ChoiceDelta], list[dict[str, Any]]]


def _reasoning_first(reasoning: ReasoningChunks | None, choices_of: ChoicesOf) -> ChoicesOf:
    """`choices_of` over each delta's content, after chunks of the reasoning it carried."""
    if reasoning is None:
        return choices_of

    def split_choices_of(index: int, delta: ChoiceDelta) -> list[dict[str, Any]]:
        said, content = reasoning.split(index, delta)
        choices = []
        for text, logprobs in said:
            choice = _chat_choice(index, {"reasoning": text})
            choice["logprobs"] = _chat_logprobs(logprobs)
            choices.append(choice)
        return choices + (choices_of(index, content) if content is not None else [])

    return split_choices_of


def _chat_choice(index: int, delta: dict[str, Any], finish_reason: str | None = None):
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


async def completion_stream(
    job: GenerationJob, updates: Updates, include_usage: bool, request_id: str
) -> AsyncGenerator[str]:
    """text_completion events: text deltas (prompt first when echo), finish, usage, [DONE]."""
    offsets: dict[int, int] = {}
    opening = []
    for index in range(len(job.prompts) * job.options.n):
        prefix = job.echo_texts[index // job.options.n] if job.echo_texts else ""
        offsets[index] = len(prefix)
        if prefix:
            opening.append(_text_choice(index, prefix))

    def choices_of(index: int, delta: ChoiceDelta) -> list[dict[str, Any]]:
        if not (delta.text or delta.finish_reason or delta.logprobs):
            return []
        choice = _text_choice(index, delta.text, delta.finish_reason)
        choice["logprobs"] = _completion_logprobs(delta.logprobs, offsets[index])
        offsets[index] += len(delta.text)
        return [choice]

    async with aclosing(
        _event_stream(
            job, updates, include_usage, request_id, "text_completion", opening, choices_of
        )
    ) as events:
        async for event in events:
            yield event


async def _event_stream(
    job: GenerationJob,
    updates: Updates,
    include_usage: bool,
    request_id: str,
    object_name: str,
    opening: list[dict[str, Any]],
    choices_of: ChoicesOf,
    reasoning: ReasoningChunks | None = None,
) -> AsyncGenerator[str]:
    """The events of either stream: one per `opening` choice, one per choice that `choices_of`
    makes of each delta, then usage (when asked) and [DONE]; an engine failure ends it with
    its error event instead."""
    envelope = _envelope(job, object_name)
    extra = {"usage": None} if include_usage else {}
    for choice in opening:
        yield sse({**envelope, **extra, "choices": [choice]})
    completion_tokens = 0
    async with aclosing(_choice_deltas(job, updates, request_id)) as deltas:
        async for item in deltas:
            if isinstance(item, str):  # the error event that ends the stream
                yield item
                return
            index, delta = item
            completion_tokens += len(delta.token_ids)
            try:
                choices = choices_of(index, delta)
            except Exception:  # a bug in shaping the chunk: end the stream as any failure does
                logger.exception("could not shape a chunk of request %s", request_id)
                if job.recorder is not None:  # the gateway's fault, not the version's
                    job.recorder.error_status = 500
                yield sse(unexpected_error_body(request_id)) + DONE
                return
            for choice in choices:
                yield sse({**envelope, **extra, "choices": [choice]})
    if include_usage:
        reasoning_tokens = reasoning.tokens() if reasoning is not None else None
        yield sse(
            {**envelope, "choices": [], "usage": usage(job, completion_tokens, reasoning_tokens)}
        )
    yield DONE


def _text_choice(index: int, text: str, finish_reason: str | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


async def _choice_deltas(
    job: GenerationJob, updates: Updates, request_id: str
) -> AsyncGenerator[tuple[int, ChoiceDelta] | str]:
    """Every choice delta with its OpenAI choice index, in engine order; or, once the engine
    fails, the error event that ends the stream (and nothing after it)."""
    async with aclosing(_guarded(updates, request_id)) as guarded:
        async for chunk in guarded:
            if isinstance(chunk, str):
                yield chunk
                return
            prompt_index, update = chunk
            for delta in update.choices:
                yield job.choice_index(prompt_index, delta.index), delta


async def _guarded(
    updates: Updates, request_id: str
) -> AsyncGenerator[tuple[int, GenerationUpdate] | str]:
    """Pass updates through; an error after the response started becomes an SSE error event.

    The HTTP status is already 200 by then, so (like OpenAI) the stream carries the error
    object and ends with [DONE] instead of hanging up mid-stream. An untyped exception gets
    the generic 500 body; its traceback goes to the log under the request id the event names.
    """
    try:
        async with aclosing(updates):
            async for item in updates:
                yield item
    except LoraplexError as exc:
        yield sse(typed_error_body(exc, request_id)) + DONE
    except Exception:
        logger.exception("unhandled error in request %s after its stream started", request_id)
        yield sse(unexpected_error_body(request_id)) + DONE
