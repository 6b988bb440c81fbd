"""Admin API payloads: strict (unknown fields refused), unlike the OpenAI surface."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from registry.models import Adapter, AdapterVersion


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImportAdapter(Strict):
    path: str = Field(description="Local PEFT folder under one of LORAPLEX_IMPORT_ROOTS.")
    name: str
    tenant: str = "default"
    visibility: Literal["private", "shared"] = "private"
    card: dict[str, Any] | None = None
    base_sha256: str | None = None

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"path": "/models/adapters/support-bot", "name": "support-bot", "tenant": "acme"}
            ]
        },
    )


class ChangeReason(Strict):
    reason: str | None = Field(None, max_length=500)


class CreateTenant(Strict):
    name: str = Field(examples=["acme"])


class VersionOut(Strict):
    name: str
    version: int
    state: str
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: list[str]
    dtype: str
    size_bytes: int
    artifact_sha256: str
    card: dict[str, Any] | None
    created_by: str
    created_at: datetime

    @classmethod
    def of(cls, row: AdapterVersion) -> VersionOut:
        return cls(
            name=row.adapter.name,
            version=row.version,
            state=row.state.value,
            rank=row.rank,
            alpha=row.alpha,
            use_rslora=row.use_rslora,
            target_modules=list(row.target_modules),
            dtype=row.dtype,
            size_bytes=row.size_bytes,
            artifact_sha256=row.artifact_sha256,
            card=row.card,
            created_by=row.created_by,
            created_at=row.created_at,
        )


class AdapterOut(Strict):
    name: str
    tenant: str
    visibility: str
    base_model: str
    created_at: datetime
    versions: list[VersionOut] | None = None

    @classmethod
    def of(cls, row: Adapter, versions: list[AdapterVersion] | None = None) -> AdapterOut:
        return cls(
            name=row.name,
            tenant=row.tenant.name,
            visibility=row.visibility.value,
            base_model=row.base_model.name,
            created_at=row.created_at,
            versions=[VersionOut.of(v) for v in versions] if versions is not None else None,
        )
