"""Admin authorization: one bearer token from LORAPLEX_ADMIN_TOKEN, compared in constant time.

/metrics has its own reader token (LORAPLEX_METRICS_TOKEN) so Prometheus need not hold the
admin token: its series name tenants, adapters and versions, which are nobody else's business
on a port the tenants reach."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from pydantic import SecretStr
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.audit_log import audit_event
from gateway.errors import LoraplexError
from gateway.http_utils import route_path, unread_body_refusal
from gateway.logging_config import redact_key_paths
from gateway.metrics import AUTH_FAILURES

ADMIN_ACTOR = "admin"
ADMIN_PREFIX = "/admin/"


class AdminUnauthorized(LoraplexError):
    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_admin_token"

    def headers(self) -> dict[str, str] | None:
        return {"WWW-Authenticate": "Bearer"}


class MetricsUnauthorized(AdminUnauthorized):
    code = "invalid_metrics_token"


class AdminDisabled(LoraplexError):
    status_code = 403
    error_type = "permission_error"
    code = "admin_api_disabled"


def _bearer_matches(request: HTTPConnection, *accepted: SecretStr) -> bool:
    scheme, _, supplied = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    given = supplied.strip().encode()
    if not given:  # a bare "Bearer" matches no token, whatever the settings let through
        return False
    # Every token is compared, so the time taken does not say which one came close.
    matches = [hmac.compare_digest(given, t.get_secret_value().encode()) for t in accepted]
    return any(matches)


def holds_admin_token(request: HTTPConnection, admin_token: SecretStr | None) -> bool:
    return admin_token is not None and _bearer_matches(request, admin_token)


def _refused(request: HTTPConnection, reason: str) -> None:
    AUTH_FAILURES.labels(reason).inc()
    audit_event(
        "auth.failure",
        reason=reason,
        path=redact_key_paths(request.url.path),  # a key pasted where its id goes
        client=request.client.host if request.client else None,
    )


def admin_refusal(request: HTTPConnection) -> LoraplexError | None:
    """The error a request without the admin token gets (its failure counted and audited), or
    None for the admin."""
    expected = request.app.state.settings.admin_token
    if expected is None:
        return AdminDisabled("The admin API is disabled: set LORAPLEX_ADMIN_TOKEN to enable it.")
    if not _bearer_matches(request, expected):
        _refused(request, "admin")
        return AdminUnauthorized("Missing or invalid admin token.")
    return None


def require_admin(request: Request) -> str:
    refusal = admin_refusal(request)
    if refusal is not None:
        raise refusal
    return ADMIN_ACTOR


class AdminGate:
    """Pure ASGI, ahead of the body limit: a caller without the admin token gets its 401/403
    on /admin/* before a byte of its body is read. FastAPI reads (and spools to disk) a
    route's whole body before it runs the route's dependencies, so require_admin alone came
    after an anonymous 2 GiB upload had been received. require_admin stays the authoritative
    check; this one only answers early."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and route_path(scope).startswith(ADMIN_PREFIX):
            request = Request(scope)
            refusal = admin_refusal(request)
            if refusal is not None:
                await unread_body_refusal(refusal, request)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def require_metrics_reader(request: Request) -> None:
    """The metrics token or the admin token, whichever is configured. With neither (a gateway
    without an admin API: a local demo), /metrics is open, and start-up warns about it."""
    settings = request.app.state.settings
    accepted = [t for t in (settings.metrics_token, settings.admin_token) if t is not None]
    if accepted and not _bearer_matches(request, *accepted):
        _refused(request, "metrics")
        raise MetricsUnauthorized("Missing or invalid metrics token (LORAPLEX_METRICS_TOKEN).")


MetricsReaderDep = Annotated[None, Depends(require_metrics_reader)]


AdminDep = Annotated[str, Depends(require_admin)]
