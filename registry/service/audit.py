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


async def change_generation(session: AsyncSession) -> int:
    """A number that grows with every admin write anywhere (the newest audit row's id: each
    write adds one in its own transaction); 0 before the first. One indexed max()."""
    return int(await session.scalar(select(func.max(AuditEntry.id))) or 0)
