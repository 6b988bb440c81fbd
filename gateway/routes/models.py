from __future__ import annotations

from typing import Any

from fastapi import APIRouter

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
async def list_models(catalog: CatalogDep) -> dict[str, Any]:
    """List the base model and every adapter the caller may use."""
    return {"object": "list", "data": [model_card(m) for m in await catalog.list_models()]}


@router.get("/{model:path}")
async def retrieve_model(model: str, catalog: CatalogDep) -> dict[str, Any]:
    """Describe one model or adapter."""
    return model_card(await catalog.resolve(model))
