"""Admin authorization: one bearer token from LORAPLEX_ADMIN_TOKEN, compared in constant time.

/metrics has its own reader token (LORAPLEX_METRICS_TOKEN) so Prometheus need not hold the
admin token: its series name tenants, adapters and versions, which are nobody else's business
on a port the tenants reach."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from pydantic import SecretStr

from gateway.audit_log import audit_event
from gateway.errors import LoraplexError
from gateway.metrics import AUTH_FAILURES

ADMIN_ACTOR = "admin"


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


def _bearer_matches(request: Request, *accepted: SecretStr) -> bool:
    scheme, _, supplied = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    given = supplied.strip().encode()
    if not given:  # a bare "Bearer" matches no token, whatever the settings let through
        return False
    # Every token is compared, so the time taken does not say which one came close.
    matches = [hmac.compare_digest(given, t.get_secret_value().encode()) for t in accepted]
    return any(matches)


def _refused(request: Request, reason: str) -> None:
    AUTH_FAILURES.labels(reason).inc()
    audit_event(
        "auth.failure",
        reason=reason,
        path=request.url.path,
        client=request.client.host if request.client else None,
    )


def require_admin(request: Request) -> str:
    expected = request.app.state.settings.admin_token
    if expected is None:
        raise AdminDisabled("The admin API is disabled: set LORAPLEX_ADMIN_TOKEN to enable it.")
    if not _bearer_matches(request, expected):
        _refused(request, "admin")
        raise AdminUnauthorized("Missing or invalid admin token.")
    return ADMIN_ACTOR


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
