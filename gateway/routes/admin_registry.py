from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy import text

from gateway.admin_auth import AdminDep
from gateway.deps import RegistryDep
from gateway.schemas.admin import CreateTenant
from registry import service

router = APIRouter(prefix="/admin/v1", tags=["admin: registry"])


@router.get("/base-models")
async def list_base_models(actor: AdminDep, registry: RegistryDep) -> list[dict[str, Any]]:
    """Base models known to the registry; `served` marks the one this gateway serves."""
    async with registry.sessions() as session:
        rows = await service.list_base_models(session)
    return [
        {
            "name": row.name,
            "weights_sha256": row.weights_sha256,
            "tokenizer_sha256": row.tokenizer_sha256,
            "model_type": row.model_type,
            "hidden_size": row.hidden_size,
            "num_layers": row.num_layers,
            "num_heads": row.num_heads,
            "num_kv_heads": row.num_kv_heads,
            "head_dim": row.head_dim,
            "vocab_size": row.vocab_size,
            "modules": row.modules,
            "served": row.weights_sha256 == registry.base.weights_sha256,
            "created_at": row.created_at,
        }
        for row in rows
    ]


@router.post("/tenants", status_code=201)
async def create_tenant(
    body: CreateTenant, actor: AdminDep, registry: RegistryDep
) -> dict[str, Any]:
    """Create a tenant (adapters are owned by one)."""
    async with registry.sessions() as session:
        row = await service.create_tenant(session, name=body.name, actor=actor)
    return {"name": row.name, "created_at": row.created_at}


@router.get("/tenants")
async def list_tenants(actor: AdminDep, registry: RegistryDep) -> list[dict[str, Any]]:
    """All tenants."""
    async with registry.sessions() as session:
        rows = await service.list_tenants(session)
    return [{"name": row.name, "created_at": row.created_at} for row in rows]


@router.get("/health")
async def registry_health(actor: AdminDep, registry: RegistryDep) -> dict[str, Any]:
    """The registry database answers and knows the served base."""
    async with registry.sessions() as session:
        await session.execute(text("SELECT 1"))
        adapters = await service.list_adapters(session)
    return {
        "status": "ok",
        "database": registry.db.url.get_backend_name(),
        "served_base": registry.base_name,
        "served_base_sha256": registry.base.weights_sha256,
        "adapters": len(adapters),
    }
