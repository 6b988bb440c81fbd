"""Structured audit events (admin actions, authentication failures) on the `loraplex.audit`
logger: one JSON object per line with LORAPLEX_LOG_JSON, `event key=value ...` otherwise.

Callers pass identifiers only (key ids, tenant names, client addresses): never a secret, a key,
a prompt or a completion. Admin actions are also rows in the registry's audit table; failed
logins are only logged, so a flood of bad keys costs no database writes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from gateway.metrics import REGISTRY_OPERATIONS
from registry.errors import RegistryError

audit_logger = logging.getLogger("loraplex.audit")


def audit_event(event: str, **fields: Any) -> None:
    clean = {k: v for k, v in fields.items() if v is not None}
    audit_logger.info(
        "%s %s",
        event,
        " ".join(f"{k}={v}" for k, v in clean.items()),
        extra={"audit": {"event": event, **clean}},
    )


@asynccontextmanager
async def registry_operation(operation: str, actor: str, **fields: Any) -> AsyncIterator[None]:
    """Count the operation by result and write one structured audit line for it."""
    try:
        yield
    except RegistryError as exc:
        REGISTRY_OPERATIONS.labels(operation, "refused").inc()
        audit_event(f"admin.{operation}", actor=actor, result="refused", code=exc.code, **fields)
        raise
    except Exception:
        REGISTRY_OPERATIONS.labels(operation, "error").inc()
        audit_event(f"admin.{operation}", actor=actor, result="error", **fields)
        raise
    REGISTRY_OPERATIONS.labels(operation, "ok").inc()
    audit_event(f"admin.{operation}", actor=actor, result="ok", **fields)
