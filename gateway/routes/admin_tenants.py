from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from gateway.admin_auth import AdminDep
from gateway.deps import TenantAdminDep
from gateway.schemas.admin import (
    ChangeReason,
    CreateKey,
    CreateTenant,
    IssuedKeyOut,
    KeyOut,
    ShareAdapter,
    SharesOut,
    TenantLimits,
    TenantOut,
)
from gateway.services.tenant_admin import key_status
from registry.models import ApiKey, Tenant

router = APIRouter(prefix="/admin/v1", tags=["admin: tenants and keys"])


def tenant_out(row: Tenant) -> TenantOut:
    return TenantOut(name=row.name, limits=row.limits or {}, created_at=row.created_at)


def key_out(row: ApiKey) -> dict[str, Any]:
    return KeyOut(
        key_id=row.key_id,
        tenant=row.tenant.name,
        label=row.label,
        status=key_status(row),  # type: ignore[arg-type]
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
    ).model_dump()


@router.post("/tenants", status_code=201)
async def create_tenant(body: CreateTenant, actor: AdminDep, admin: TenantAdminDep) -> TenantOut:
    """Create a tenant, optionally with its limits (omitted limits = unlimited)."""
    limits = body.limits.model_dump(exclude_none=True) if body.limits else None
    return tenant_out(await admin.create_tenant(body.name, limits, actor))


@router.get("/tenants")
async def list_tenants(actor: AdminDep, admin: TenantAdminDep) -> list[TenantOut]:
    """All tenants with their limits."""
    return [tenant_out(row) for row in await admin.list_tenants()]


@router.get("/tenants/{name}")
async def get_tenant(name: str, actor: AdminDep, admin: TenantAdminDep) -> TenantOut:
    """One tenant with its limits."""
    return tenant_out(await admin.get_tenant(name))


@router.patch("/tenants/{name}/limits")
async def update_limits(
    name: str, body: TenantLimits, actor: AdminDep, admin: TenantAdminDep
) -> TenantOut:
    """Change limits: fields sent replace the current ones, `null` removes one (unlimited).
    Applies from the next request on this replica, within one registry poll on others."""
    changes = {field: getattr(body, field) for field in body.model_fields_set}
    return tenant_out(await admin.update_limits(name, changes, actor))


@router.post("/tenants/{name}/keys", status_code=201)
async def create_key(
    name: str, actor: AdminDep, admin: TenantAdminDep, body: CreateKey | None = None
) -> IssuedKeyOut:
    """Issue an API key for the tenant. The secret is in this response only."""
    body = body or CreateKey.model_validate({})
    issued = await admin.create_key(
        name,
        label=body.label,
        expires_at=body.expires_at,
        expires_in_days=body.expires_in_days,
        actor=actor,
    )
    return IssuedKeyOut(**key_out(issued.key), key=issued.plaintext)


@router.get("/keys")
async def list_keys(
    actor: AdminDep, admin: TenantAdminDep, tenant: str | None = None
) -> list[KeyOut]:
    """API keys (never their secrets), optionally of one tenant."""
    return [KeyOut(**key_out(row)) for row in await admin.list_keys(tenant)]


@router.post("/keys/{key_id}/revoke")
async def revoke_key(
    key_id: str, actor: AdminDep, admin: TenantAdminDep, body: ChangeReason | None = None
) -> KeyOut:
    """Revoke a key: refused from the next request here, on other replicas within a poll."""
    row = await admin.revoke_key(key_id, body.reason if body else None, actor)
    return KeyOut(**key_out(row))


@router.get("/adapters/{name}/shares")
async def list_shares(name: str, actor: AdminDep, admin: TenantAdminDep) -> SharesOut:
    """Tenants a private adapter is shared with (besides its owner)."""
    return SharesOut(adapter=name, tenants=await admin.list_shares(name))


@router.post("/adapters/{name}/shares")
async def share_adapter(
    name: str, body: ShareAdapter, actor: AdminDep, admin: TenantAdminDep
) -> SharesOut:
    """Let one more tenant use this adapter."""
    return SharesOut(adapter=name, tenants=await admin.share(name, body.tenant, actor))


@router.delete("/adapters/{name}/shares/{tenant}")
async def unshare_adapter(
    name: str, tenant: str, actor: AdminDep, admin: TenantAdminDep
) -> SharesOut:
    """Stop sharing this adapter with a tenant (its next request gets 404)."""
    return SharesOut(adapter=name, tenants=await admin.unshare(name, tenant, actor))
