"""Explicit shares: a private adapter made usable by named tenants besides its owner.

Adapters with Visibility.SHARED are usable by every tenant already; a share adds one tenant to a
private adapter's audience. Both calls are idempotent: sharing twice or unsharing what is not
shared changes nothing and writes no audit row.
"""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from registry.errors import InvalidInput
from registry.models import AdapterShare, Tenant
from registry.service.audit import record
from registry.service.licenses import refuse_sharing_partner_data
from registry.service.queries import get_adapter, is_shared_with, lock_adapter
from registry.service.tenants import get_tenant


async def share_adapter(session: AsyncSession, *, name: str, tenant: str, actor: str) -> None:
    """Let `tenant` use adapter `name`. Raises AdapterNotFound, TenantNotFound, or InvalidInput
    when `tenant` owns the adapter or it serves a PARTNER_ONLY version (registry.service.
    licenses)."""
    adapter = await get_adapter(session, name=name)
    grantee = await get_tenant(session, name=tenant)
    if adapter.tenant_id == grantee.id:
        raise InvalidInput(f"tenant {tenant!r} owns adapter {name!r}; it needs no share")
    if await is_shared_with(session, adapter_id=adapter.id, tenant_id=grantee.id):
        return
    await lock_adapter(session, name)  # a registration racing this share decides after it
    await refuse_sharing_partner_data(session, adapter)
    session.add(AdapterShare(adapter_id=adapter.id, tenant_id=grantee.id))
    record(
        session,
        actor=actor,
        action="adapter.share",
        target=f"adapter:{name}",
        details={"tenant": tenant},
    )
    try:
        await session.commit()
    except IntegrityError:
        # A concurrent call shared it first (and audited it): the outcome asked for holds.
        await session.rollback()


async def unshare_adapter(session: AsyncSession, *, name: str, tenant: str, actor: str) -> None:
    """Stop `tenant` using adapter `name` through a share (ownership and Visibility.SHARED are
    unaffected). Raises AdapterNotFound or TenantNotFound."""
    adapter = await get_adapter(session, name=name)
    grantee = await get_tenant(session, name=tenant)
    removed = await session.execute(
        delete(AdapterShare).where(
            AdapterShare.adapter_id == adapter.id, AdapterShare.tenant_id == grantee.id
        )
    )
    if not removed.rowcount:  # type: ignore[attr-defined]
        await session.rollback()
        return
    record(
        session,
        actor=actor,
        action="adapter.unshare",
        target=f"adapter:{name}",
        details={"tenant": tenant},
    )
    await session.commit()


async def list_adapter_shares(session: AsyncSession, *, name: str) -> list[str]:
    """Names of the tenants adapter `name` is explicitly shared with, sorted. Raises
    AdapterNotFound."""
    adapter = await get_adapter(session, name=name)
    names = await session.scalars(
        select(Tenant.name)
        .join(AdapterShare, AdapterShare.tenant_id == Tenant.id)
        .where(AdapterShare.adapter_id == adapter.id)
        .order_by(Tenant.name)
    )
    return list(names.all())
