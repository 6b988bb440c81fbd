"""Small HTTP plumbing shared by routes: request ids, SSE responses, disconnect-aware waits."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

T = TypeVar("T")
REQUEST_ID_HEADER = "x-request-id"
MAX_CLIENT_REQUEST_ID = 128


class RequestIdMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware: it would buffer streams and hide disconnects)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        supplied = (
            dict(scope.get("headers", [])).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        )
        rid = supplied if 0 < len(supplied) <= MAX_CLIENT_REQUEST_ID else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.encode(), rid.encode("latin-1")))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_id)


class ClientDisconnected(Exception):
    pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run work; cancel it (aborting engine requests) if the client hangs up first."""
    task: asyncio.Future[Any] = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher: asyncio.Future[Any] = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        result: T = task.result()
        return result
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientDisconnected()


def event_stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    headers: dict[str, Any] = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(chunks, media_type="text/event-stream", headers=headers)
