"""A /v1 request's tenant key is verified before its body is read.

FastAPI reads a route's whole body, and parses it into the request model, before it solves the
route's dependencies: `require_tenant` alone let a caller with no key, or a wrong one, make the
gateway receive up to LORAPLEX_MAX_REQUEST_BYTES and parse it before the 401. The gate verifies
the key first, by the dependency's own code (the key cache, the audit log and the metrics, its
401 and its 503s), and leaves the principal in the request's state for `require_tenant`.
"""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.auth import authenticate_ahead
from gateway.errors import LoraplexError, RegistryBusy
from gateway.http_utils import route_path, unread_body_refusal
from registry.db import is_contention

logger = logging.getLogger(__name__)

V1_PREFIX = "/v1/"
# Requests that carry no body lose nothing waiting for the route: GET /v1/models stays as it was.
BODILESS_METHODS = frozenset({"GET", "HEAD"})


class TenantGate:
    """Pure ASGI, inside the request metrics (which count its 401 as they counted the route's)
    and the request id. Gates every /v1 path but for GET and HEAD, so a route added under /v1
    is covered without being listed; an unknown path answers 401 before its 404."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if _gated(scope):
            refusal = await _verify(Request(scope))
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _gated(scope: Scope) -> bool:
    return (
        scope["type"] == "http"
        and scope["method"] not in BODILESS_METHODS
        and route_path(scope).startswith(V1_PREFIX)
    )


async def _verify(request: Request) -> Response | None:
    """The answer for a caller refused; None to go on to the route, the principal passed on."""
    try:
        await authenticate_ahead(request)
    except LoraplexError as refusal:
        return unread_body_refusal(refusal, request)
    except Exception as exc:
        if is_contention(exc):
            # A lock or busy timeout: the route would wait it out again, doubling the load on
            # a database already contended, before the same 503.
            return unread_body_refusal(RegistryBusy(), request)
        # The app's own handlers answer what is not typed (a 500 with its request id): the
        # route verifies again, after the body, as it did before the gate.
        logger.warning("verifying a key ahead of its route failed", exc_info=True)
        return None
    return None
