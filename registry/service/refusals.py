"""A refused registration, recorded: the audit row says who tried what and why, nothing else
is stored, and the caller gets AdapterRejected with every reason."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from registry.compat.problems import Problem
from registry.errors import AdapterRejected
from registry.service.audit import record


async def reject_registration(
    session: AsyncSession,
    *,
    actor: str,
    name: str,
    tenant: str,
    problems: list[Problem],
    **details: Any,
) -> None:
    """Record the refusal and raise AdapterRejected. `details` join the audit row's (e.g. a
    stack's). Nothing but reads may have happened in the transaction: committing the audit
    row then stores only the refusal (and releases any row lock) without expiring the
    caller's loaded objects."""
    record(
        session,
        actor=actor,
        action="adapter_version.reject",
        target=f"adapter:{name[:80]}",
        details={"tenant": tenant, **details, "problems": [p.as_dict() for p in problems]},
    )
    await session.commit()
    raise AdapterRejected(problems)
