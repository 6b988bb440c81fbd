"""Request bodies are bounded before anything reads them whole.

Starlette parses (and spools to disk) a whole multipart body before a route sees a byte, so
the adapter upload's own byte count (registry.ingest.receive_stream) came after a 40 MiB body
had been read under a 1 MiB limit. This pure ASGI middleware refuses a body over its limit on
the declared Content-Length at once, and counts the bytes of one without it (chunked), answering
413 as soon as the count passes the limit. The upload route's limit is
LORAPLEX_UPLOAD_MAX_BYTES plus room for the multipart framing, for the admin only (anyone else
could make the gateway spool gigabytes before the route's own auth ran), and a dataset n-gram
filter's PUT LORAPLEX_NGRAM_FILTER_MAX_BYTES plus its header, likewise; every other request's
is LORAPLEX_MAX_REQUEST_BYTES (JSON requests: prompts, admin calls). gateway.admin_auth.AdminGate,
ahead of this layer, answers /admin/* without reading the body when the admin token is missing,
and gateway.tenant_gate.TenantGate, behind it, answers /v1/* so when the tenant key is wrong.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from pydantic import SecretStr
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.admin_auth import holds_admin_token
from gateway.http_utils import route_path

# Multipart boundaries, part headers and the small form fields beside the files.
MULTIPART_SLACK_BYTES = 1024 * 1024
# A dataset n-gram filter's first two lines (registry.ngram_filter.MAX_HEADER_BYTES and more).
NGRAM_FILTER_SLACK_BYTES = 8 * 1024


class BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """Pure ASGI (BaseHTTPMiddleware would buffer streams). `limit_for(scope)` gives the byte
    limit of a request's body."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[Scope], int]):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _refuse(send, limit)
            return
        received = 0
        exceeded = False
        answered = False

        async def counted() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise BodyTooLarge()
            return message

        async def replaced(message: Message) -> None:
            # The app turned the failed read into a response of its own (FastAPI: 400 "error
            # parsing the body"): the client gets the 413 instead, once.
            nonlocal answered
            if not exceeded:
                await send(message)
            elif not answered:
                answered = True
                await _refuse(send, limit)

        try:
            await self.app(scope, counted, replaced)
        except BodyTooLarge:
            if not answered:
                await _refuse(send, limit)


async def _refuse(send: Send, limit: int) -> None:
    body = json.dumps(
        {
            "error": {
                "message": f"the request body exceeds the limit of {limit} bytes",
                "type": "invalid_request_error",
                "param": None,
                "code": "request_too_large",
            }
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


NGRAM_FILTER_PATH = re.compile(r"/admin/v1/datasets/[^/]+/ngram-filter")


def limits_by_route(
    upload_max_bytes: int,
    max_request_bytes: int,
    admin_token: SecretStr | None,
    ngram_filter_max_bytes: int = 0,
) -> Callable[[Scope], int]:
    upload = upload_max_bytes + MULTIPART_SLACK_BYTES
    ngram_filter = ngram_filter_max_bytes + NGRAM_FILTER_SLACK_BYTES

    def limit_for(scope: Scope) -> int:
        method, path = scope.get("method"), route_path(scope).rstrip("/")
        if method == "POST" and path == "/admin/v1/adapters":
            limit = upload
        elif method == "PUT" and NGRAM_FILTER_PATH.fullmatch(path):
            limit = ngram_filter
        else:
            return max_request_bytes
        return limit if holds_admin_token(HTTPConnection(scope), admin_token) else max_request_bytes

    return limit_for
