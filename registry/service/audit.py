"""The audit trail: every admin action adds one row in the same transaction as the change."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from registry.models import AuditEntry


def record(
    session: AsyncSession, *, actor: str, action: str, target: str, details: dict[str, Any]
) -> AuditEntry:
    """Stage an audit row; the caller's commit makes it durable together with the change."""
    entry = AuditEntry(actor=actor[:200], action=action, target=target[:200], details=details)
    session.add(entry)
    return entry


async def list_audit(
    session: AsyncSession,
    *,
    target: str | None = None,
    action: str | None = None,
    limit: int = 100,
) -> list[AuditEntry]:
    """Newest first."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if target is not None:
        query = query.where(AuditEntry.target == target)
    if action is not None:
        query = query.where(AuditEntry.action == action)
    return list((await session.scalars(query)).all())


# Audit ids are handed out when a transaction flushes, not when it commits: on PostgreSQL a
# write that flushed first may commit after a later one was already seen. Rows this far behind
# the newest id are counted too, so such a late commit still changes the generation.
LATE_COMMIT_WINDOW = 10_000


async def change_generation(session: AsyncSession) -> tuple[int, int]:
    """Changes whenever an admin write commits anywhere (each adds an audit row in its own
    transaction): the newest audit id and how many rows lie within LATE_COMMIT_WINDOW of it.
    Both index range reads; (0, 0) before the first write."""
    newest = int(await session.scalar(select(func.max(AuditEntry.id))) or 0)
    recent = select(func.count()).where(AuditEntry.id > newest - LATE_COMMIT_WINDOW)
    return newest, int(await session.scalar(recent) or 0)
