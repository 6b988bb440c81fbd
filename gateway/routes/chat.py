from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from gateway.answer_receipts import attach_answer_receipt
from gateway.auth import TenantDep
from gateway.deps import ServiceDep
from gateway.errors import request_id_of
from gateway.http_utils import ClientDisconnected, event_stream, until_disconnected
from gateway.request_metrics import note_generation, note_scope
from gateway.rollout_router import sticky_key
from gateway.schemas.openai import ChatCompletionRequest
from gateway.services.generation_job import new_request_id
from gateway.services.openai_format import chat_completion_body, chat_stream

router = APIRouter(prefix="/v1/chat", tags=["openai"])


@router.post("/completions", response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    response: Response,
    service: ServiceDep,
    caller: TenantDep,
) -> dict[str, Any] | Response:
    """Create a chat completion with the base model or the adapter named by `model`."""
    key = sticky_key(body.user, request.headers.get("x-session-id"), caller.key_id)
    try:
        # Watched too: preparing may wait for an adapter slot (up to 30 s), and a client that
        # left meanwhile must not take the slot, evict another adapter and run.
        job = await until_disconnected(
            request,
            service.prepare_chat(
                body,
                new_request_id("chatcmpl"),
                caller,
                key,
                note_scope=lambda scope: note_scope(request.state, scope),
            ),
            discard=lambda job: job.finish(),
        )
    except ClientDisconnected:
        return Response(status_code=499)
    note_generation(request.state, job.recorder)
    if body.stream:
        try:
            # Watched like the non-stream wait: a client that leaves before the first token
            # (engine busy, long prefill) frees its engine request and its slot at once.
            updates = await until_disconnected(request, service.open_stream(job))
        except ClientDisconnected:
            job.finish()
            return Response(status_code=499)
        chunks = chat_stream(job, updates, body.include_usage_in_stream(), request_id_of(request))
        return event_stream(chunks, updates)
    try:
        choices = await until_disconnected(request, service.collect(job))
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        job.finish()
    answer = chat_completion_body(job, choices)
    await attach_answer_receipt(request, response, answer)
    return answer
