"""Admin authorization: one bearer token from LORAPLEX_ADMIN_TOKEN, compared in constant time."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

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


class AdminDisabled(LoraplexError):
    status_code = 403
    error_type = "permission_error"
    code = "admin_api_disabled"


def require_admin(request: Request) -> str:
    expected = request.app.state.settings.admin_token
    if expected is None:
        raise AdminDisabled("The admin API is disabled: set LORAPLEX_ADMIN_TOKEN to enable it.")
    scheme, _, supplied = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        supplied.strip().encode(), expected.get_secret_value().encode()
    ):
        AUTH_FAILURES.labels("admin").inc()
        audit_event(
            "auth.failure",
            reason="admin",
            path=request.url.path,
            client=request.client.host if request.client else None,
        )
        raise AdminUnauthorized("Missing or invalid admin token.")
    return ADMIN_ACTOR


AdminDep = Annotated[str, Depends(require_admin)]
