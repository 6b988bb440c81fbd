"""Structured audit events (admin actions, authentication failures) on the `loraplex.audit`
logger: one JSON object per line with LORAPLEX_LOG_JSON, `event key=value ...` otherwise.

Callers pass identifiers only (key ids, tenant names, client addresses): never a secret, a key,
a prompt or a completion. Admin actions are also rows in the registry's audit table; failed
logins are only logged, so a flood of bad keys costs no database writes.

Values are often the caller's own text, logged before anything validated it (a request path,
an adapter name from the URL): each is cut to MAX_VALUE_CHARS and, unless it is plain visible
ASCII, written as a JSON string, so that no value can end the line or forge a field.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from gateway.errors import LoraplexError
from gateway.metrics import REGISTRY_OPERATIONS
from registry.errors import RegistryError

audit_logger = logging.getLogger("loraplex.audit")

MAX_VALUE_CHARS = 200
# Visible ASCII but the quote, which starts a quoted value.
_PLAIN = re.compile(r"[!#-~]+")


def _bounded(value: Any) -> Any:
    if isinstance(value, bool | int | float):
        return value
    text = str(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS] + "..."


def _rendered(value: Any) -> str:
    text = str(value)
    # ensure_ascii: NEL, LS and PS end a line for some readers as surely as \n does.
    return text if _PLAIN.fullmatch(text) else json.dumps(text, ensure_ascii=True)


def audit_event(event: str, **fields: Any) -> None:
    clean = {k: _bounded(v) for k, v in fields.items() if v is not None}
    audit_logger.info(
        "%s %s",
        _rendered(event),
        " ".join(f"{k}={_rendered(v)}" for k, v in clean.items()),
        extra={"audit": {"event": event, **clean}},
    )


def _refusal_code(exc: Exception) -> str | None:
    """The refusal's code for a caller's mistake; None for a failure of the gateway's own."""
    if isinstance(exc, RegistryError):
        return exc.code
    if isinstance(exc, LoraplexError) and exc.status_code < 500:
        return exc.code or exc.error_type
    return None


@asynccontextmanager
async def registry_operation(operation: str, actor: str, **fields: Any) -> AsyncIterator[None]:
    """Count the operation by result and write one structured audit line for it."""
    try:
        yield
    except Exception as exc:
        code = _refusal_code(exc)
        result = "error" if code is None else "refused"
        REGISTRY_OPERATIONS.labels(operation, result).inc()
        audit_event(f"admin.{operation}", actor=actor, result=result, code=code, **fields)
        raise
    REGISTRY_OPERATIONS.labels(operation, "ok").inc()
    audit_event(f"admin.{operation}", actor=actor, result="ok", **fields)
