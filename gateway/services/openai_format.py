"""OpenAI response bodies and SSE chunks for chat and text completions, byte-for-byte in shape."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from gateway.engine.client import GenerationUpdate, TokenLogprob
from gateway.errors import LoraplexError, error_body
from gateway.services.generation_job import ChoiceResult, GenerationJob

Updates = AsyncIterator[tuple[int, GenerationUpdate]]

DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


def usage(job: GenerationJob, completion_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": job.prompt_tokens + completion_tokens,
    }
    cached = job.cached_prompt_tokens
    if cached is not None:
        body["prompt_tokens_details"] = {"cached_tokens": cached}
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
        "top_logprobs": [dict(e.top) for e in entries],
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
    return {
        **_envelope(job, "chat.completion"),
        "choices": [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": _chat_logprobs(c.logprobs),
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        "usage": usage(job, sum(len(c.token_ids) for c in choices)),
    }


def completion_body(job: GenerationJob, choices: list[ChoiceResult]) -> dict[str, Any]:
    body_choices = []
    for c in choices:
        prefix = job.echo_texts[c.index // job.options.n] if job.echo_texts else ""
        body_choices.append(
            {
                "index": c.index,
                "text": prefix + c.text,
                "logprobs": _completion_logprobs(c.logprobs, len(prefix)),
                "finish_reason": c.finish_reason,
            }
        )
    return {
        **_envelope(job, "text_completion"),
        "choices": body_choices,
        "usage": usage(job, sum(len(c.token_ids) for c in choices)),
    }


async def chat_stream(job: GenerationJob, updates: Updates, include_usage: bool):
    """chat.completion.chunk events: role first, then content deltas, finish, usage, [DONE]."""
    envelope = _envelope(job, "chat.completion.chunk")
    extra = {"usage": None} if include_usage else {}
    for index in range(len(job.prompts) * job.options.n):
        yield sse(
            {
                **envelope,
                **extra,
                "choices": [_chat_choice(index, {"role": "assistant", "content": ""})],
            }
        )
    completion_tokens = 0
    async for chunk in _guarded(updates):
        if isinstance(chunk, str):
            yield chunk
            return
        prompt_index, update = chunk
        for delta in update.choices:
            completion_tokens += len(delta.token_ids)
            index = job.choice_index(prompt_index, delta.index)
            if delta.text or delta.logprobs:
                choice = _chat_choice(index, {"content": delta.text})
                choice["logprobs"] = _chat_logprobs(delta.logprobs)
                yield sse({**envelope, **extra, "choices": [choice]})
            if delta.finish_reason:
                choice = _chat_choice(index, {}, finish_reason=delta.finish_reason)
                yield sse({**envelope, **extra, "choices": [choice]})
    if include_usage:
        yield sse({**envelope, "choices": [], "usage": usage(job, completion_tokens)})
    yield DONE


def _chat_choice(index: int, delta: dict[str, Any], finish_reason: str | None = None):
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


async def completion_stream(job: GenerationJob, updates: Updates, include_usage: bool):
    """text_completion events: text deltas (prompt first when echo), finish, usage, [DONE]."""
    envelope = _envelope(job, "text_completion")
    extra = {"usage": None} if include_usage else {}
    offsets = {}
    for index in range(len(job.prompts) * job.options.n):
        prefix = job.echo_texts[index // job.options.n] if job.echo_texts else ""
        offsets[index] = len(prefix)
        if prefix:
            yield sse({**envelope, **extra, "choices": [_text_choice(index, prefix)]})
    completion_tokens = 0
    async for chunk in _guarded(updates):
        if isinstance(chunk, str):
            yield chunk
            return
        prompt_index, update = chunk
        for delta in update.choices:
            completion_tokens += len(delta.token_ids)
            index = job.choice_index(prompt_index, delta.index)
            if delta.text or delta.finish_reason or delta.logprobs:
                choice = _text_choice(index, delta.text, delta.finish_reason)
                choice["logprobs"] = _completion_logprobs(delta.logprobs, offsets[index])
                offsets[index] += len(delta.text)
                yield sse({**envelope, **extra, "choices": [choice]})
    if include_usage:
        yield sse({**envelope, "choices": [], "usage": usage(job, completion_tokens)})
    yield DONE


def _text_choice(index: int, text: str, finish_reason: str | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


async def _guarded(updates: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Pass updates through; an error after the response started becomes an SSE error event.

    The HTTP status is already 200 by then, so (like OpenAI) the stream carries the error
    object and ends with [DONE] instead of hanging up mid-stream.
    """
    try:
        async for item in updates:
            yield item
    except LoraplexError as exc:
        yield sse(error_body(exc.message, exc.error_type, param=exc.param, code=exc.code)) + DONE
