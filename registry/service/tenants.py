"""Tenants: the owners of private adapters (API keys and limits come in a later issue)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from registry.errors import DuplicateTenant, TenantNotFound
from registry.models import Tenant
from registry.naming import validate_name
from registry.service.audit import record


async def create_tenant(session: AsyncSession, *, name: str, actor: str) -> Tenant:
    validate_name(name, what="tenant")
    if await session.scalar(select(Tenant).where(Tenant.name == name)) is not None:
        raise DuplicateTenant(f"tenant {name!r} already exists")
    tenant = Tenant(name=name)
    session.add(tenant)
    record(session, actor=actor, action="tenant.create", target=f"tenant:{name}", details={})
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise DuplicateTenant(f"tenant {name!r} already exists") from None
    return tenant


async def get_tenant(session: AsyncSession, *, name: str) -> Tenant:
    tenant = await session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        raise TenantNotFound(f"tenant {name!r} does not exist")
    return tenant


async def list_tenants(session: AsyncSession) -> list[Tenant]:
    return list((await session.scalars(select(Tenant).order_by(Tenant.name))).all())
