"""Small HTTP plumbing shared by routes and middlewares: request ids, route paths, answers given
before a body is read, SSE responses, disconnect-aware waits."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import LoraplexError, request_id_of, typed_error_body

T = TypeVar("T")
REQUEST_ID_HEADER = "x-request-id"
MAX_CLIENT_REQUEST_ID = 128

logger = logging.getLogger(__name__)


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


def route_path(scope: Scope) -> str:
    """The path the router matches: the path below the root path (a proxy's prefix, a mount),
    by Starlette's own rule (its router's get_route_path), so that a gate in front of the router
    sees every request the way the router will."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root) :]
    return path


def unread_body_refusal(error: LoraplexError, request: Request) -> JSONResponse:
    """A typed error's response (as the app's handler renders it) given before the request's
    body was read. The connection is closed after it: else the server goes on reading, and
    dropping, whatever the client still sends of the body, to reuse the connection."""
    headers = {**(error.headers() or {}), "Connection": "close"}
    return JSONResponse(
        typed_error_body(error, request_id_of(request)),
        status_code=error.status_code,
        headers=headers,
    )


class ClientDisconnected(Exception):
    pass


async def until_disconnected(
    request: Request, work: Awaitable[T], discard: Callable[[T], None] | None = None
) -> T:
    """Run work; cancel it (aborting engine requests) if the client hangs up first. Work
    that finished anyway as it was cancelled hands its result to `discard` (a prepared job
    holding an adapter pin and a tenant's lease must be finished by someone)."""
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
    if discard is not None and not task.cancelled() and task.exception() is None:
        discard(task.result())
    raise ClientDisconnected()


class SupportsAclose(Protocol):
    async def aclose(self) -> None: ...


# Closes still running after their response was cancelled (asyncio keeps only weak references
# to tasks: an unreferenced one could be collected half-way).
_closing: set[asyncio.Task[None]] = set()


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its body generator however the response ends.

    Starlette's leaves it to the garbage collector when the client hangs up while `send()` is
    blocked (a slow reader): the generator sits at a `yield`, and only its close reaches the
    engine request (abort) and the job (lease, adapter pin, metrics). `sources` are closed
    after the body: what the body would have closed had it ever started iterating."""

    def __init__(
        self,
        content: AsyncGenerator[str],
        *sources: SupportsAclose,
        headers: dict[str, str] | None = None,
        media_type: str | None = None,
    ):
        super().__init__(content, headers=headers, media_type=media_type)
        self._to_close: tuple[SupportsAclose, ...] = (content, *sources)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            task = asyncio.ensure_future(self._close())
            _closing.add(task)
            task.add_done_callback(_closing.discard)
            # Shielded: this runs while the response is being cancelled, and a second
            # cancellation must not interrupt the abort half-way.
            await asyncio.shield(task)

    async def _close(self) -> None:
        for source in self._to_close:
            try:
                await source.aclose()
            except Exception:
                logger.exception("closing a response stream failed")


def event_stream(chunks: AsyncGenerator[str], *sources: SupportsAclose) -> StreamingResponse:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return ClosingStreamingResponse(
        chunks, *sources, media_type="text/event-stream", headers=headers
    )
