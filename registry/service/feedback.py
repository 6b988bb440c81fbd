"""Callers' verdicts on responses (the gateway's POST /v1/feedback), one per response across
every replica and restart: the first verdict recorded is the one that counts; a later call is
told what it was (the same: a client's retry; another: a conflict)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from registry.models import FeedbackVerdict

# A verdict pruned between this call's insert and its read (only a row past the feedback
# window, so never in practice) is inserted again rather than reported as missing.
ATTEMPTS = 2


async def record_verdict(
    session: AsyncSession, *, response_sha256: str, outcome: str, at: datetime, token: str
) -> str | None:
    """Record `outcome` for the response unless a verdict is recorded already. None when this
    call recorded it (committed), else the outcome recorded first. Two replicas recording the
    same response at once: the primary key lets exactly one insert, the other reads its row
    (PostgreSQL's insert waits for the first transaction to end; SQLite's writes queue).
    `token`, unique to the call, is stored with the row (see `verdict_of`)."""
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    for _ in range(ATTEMPTS):
        statement = (
            insert(FeedbackVerdict)
            .values(
                response_sha256=response_sha256, outcome=outcome, recorded_at=at, recorded_by=token
            )
            .on_conflict_do_nothing(index_elements=[FeedbackVerdict.response_sha256])
        )
        inserted = (await session.execute(statement)).rowcount  # type: ignore[attr-defined]
        await session.commit()
        if inserted:
            return None
        recorded = await session.scalar(
            select(FeedbackVerdict.outcome).where(
                FeedbackVerdict.response_sha256 == response_sha256
            )
        )
        await session.commit()  # end the read's transaction: the session may be reused
        if recorded is not None:
            return recorded
    raise RuntimeError(f"verdict {response_sha256[:12]}... neither inserted nor found")


async def verdict_of(session: AsyncSession, *, response_sha256: str) -> tuple[str, str] | None:
    """The recorded verdict's (outcome, token of the call that recorded it), if any: a caller
    whose record_verdict raised learns from it whether its own commit went through."""
    row = (
        await session.execute(
            select(FeedbackVerdict.outcome, FeedbackVerdict.recorded_by).where(
                FeedbackVerdict.response_sha256 == response_sha256
            )
        )
    ).first()
    await session.commit()
    return None if row is None else (row[0], row[1])


async def prune_verdicts(session: AsyncSession, *, recorded_before: datetime) -> int:
    """Delete the verdicts recorded before `recorded_before` (past the feedback window); how
    many went."""
    result = await session.execute(
        delete(FeedbackVerdict).where(FeedbackVerdict.recorded_at < recorded_before)
    )
    await session.commit()
    return int(result.rowcount)  # type: ignore[attr-defined]
