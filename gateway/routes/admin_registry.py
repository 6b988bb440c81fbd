from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from gateway.admin_auth import AdminDep
from gateway.deps import RegistryDep
from gateway.schemas.admin import BaseModelOut, RegistryHealthOut
from registry import service

router = APIRouter(prefix="/admin/v1", tags=["admin: registry"])


@router.get("/base-models")
async def list_base_models(actor: AdminDep, registry: RegistryDep) -> list[BaseModelOut]:
    """Base models known to the registry; `served` marks the one this gateway serves."""
    async with registry.sessions() as session:
        rows = await service.list_base_models(session)
    return [
        BaseModelOut(
            name=row.name,
            weights_sha256=row.weights_sha256,
            tokenizer_sha256=row.tokenizer_sha256,
            model_type=row.model_type,
            hidden_size=row.hidden_size,
            num_layers=row.num_layers,
            num_heads=row.num_heads,
            num_kv_heads=row.num_kv_heads,
            head_dim=row.head_dim,
            vocab_size=row.vocab_size,
            modules=row.modules,
            served=row.weights_sha256 == registry.base.weights_sha256,
            created_at=row.created_at,
        )
        for row in rows
    ]


@router.get("/health")
async def registry_health(actor: AdminDep, registry: RegistryDep) -> RegistryHealthOut:
    """The registry database answers and knows the served base."""
    async with registry.sessions() as session:
        await session.execute(text("SELECT 1"))
        adapters = await service.list_adapters(session)
    return RegistryHealthOut(
        status="ok",
        database=registry.db.url.get_backend_name(),
        served_base=registry.base_name,
        served_base_sha256=registry.base.weights_sha256,
        adapters=len(adapters),
        engine_lora_dtype=registry.engine_dtype,
    )
