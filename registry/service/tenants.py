"""Tenants: the owners of private adapters, each with one policy (limits, base-model access).
Their API keys: registry.service.keys."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from registry.errors import DuplicateTenant, TenantNotFound
from registry.models import Tenant
from registry.naming import validate_name
from registry.service.audit import record
from registry.service.queries import sqlite_write_lock
from registry.tenancy import validate_policy


async def create_tenant(
    session: AsyncSession, *, name: str, actor: str, policy: Mapping[str, Any] | None = None
) -> Tenant:
    """Raises InvalidName, InvalidPolicy (every problem) or DuplicateTenant."""
    validate_name(name, what="tenant")
    stored = validate_policy(policy).to_stored() if policy is not None else None
    if await session.scalar(select(Tenant).where(Tenant.name == name)) is not None:
        raise DuplicateTenant(f"tenant {name!r} already exists")
    tenant = Tenant(name=name, limits=stored)
    session.add(tenant)
    details = {"policy": stored} if stored is not None else {}
    record(session, actor=actor, action="tenant.create", target=f"tenant:{name}", details=details)
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise DuplicateTenant(f"tenant {name!r} already exists") from None
    return tenant


async def update_tenant_policy(
    session: AsyncSession, *, tenant: str, policy: Mapping[str, Any], actor: str
) -> Tenant:
    """Replace the tenant's whole policy (fields left out become unlimited / default).
    Raises InvalidPolicy listing every problem, or TenantNotFound."""
    stored = validate_policy(policy).to_stored()
    row = await get_tenant(session, name=tenant, for_update=True)
    row.limits = stored
    record(
        session,
        actor=actor,
        action="tenant.policy",
        target=f"tenant:{row.name}",
        details={"policy": stored},
    )
    await session.commit()
    return row


async def change_tenant_policy(
    session: AsyncSession, *, tenant: str, changes: Mapping[str, Any], actor: str
) -> Tenant:
    """Merge `changes` into the tenant's policy under its lock (a None value clears that
    field: unlimited), so two admins changing different fields at once both take effect."""
    row = await get_tenant(session, name=tenant, for_update=True)
    merged = {**(row.limits or {}), **changes}
    policy = {k: v for k, v in merged.items() if v is not None}
    return await update_tenant_policy(session, tenant=tenant, policy=policy, actor=actor)


async def get_tenant(session: AsyncSession, *, name: str, for_update: bool = False) -> Tenant:
    query = select(Tenant).where(Tenant.name == name)
    if for_update:
        no_op = update(Tenant).where(Tenant.name == name).values(name=Tenant.name)
        await sqlite_write_lock(session, no_op)
        query = query.with_for_update().execution_options(populate_existing=True)
    tenant = await session.scalar(query)
    if tenant is None:
        raise TenantNotFound(f"tenant {name!r} does not exist")
    return tenant


async def list_tenants(session: AsyncSession) -> list[Tenant]:
    return list((await session.scalars(select(Tenant).order_by(Tenant.name))).all())
