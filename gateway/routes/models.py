from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from gateway.auth import TenantDep
from gateway.catalog import ServedModel
from gateway.deps import CatalogDep

router = APIRouter(prefix="/v1/models", tags=["openai"])


def model_card(model: ServedModel) -> dict[str, Any]:
    card: dict[str, Any] = {
        "id": model.name,
        "object": "model",
        "created": model.created,
        "owned_by": model.owned_by,
    }
    if model.parent is not None:
        card["parent"] = model.parent
        card["root"] = model.parent
    return card


@router.get("")
async def list_models(catalog: CatalogDep, caller: TenantDep) -> dict[str, Any]:
    """List exactly what the caller may use: the base (if its policy allows) and adapters."""
    models = await catalog.list_models(caller)
    return {"object": "list", "data": [model_card(m) for m in models]}


@router.get("/{model:path}")
async def retrieve_model(model: str, catalog: CatalogDep, caller: TenantDep) -> dict[str, Any]:
    """Describe one model or adapter the caller may use."""
    return model_card(await catalog.describe(model, caller))
