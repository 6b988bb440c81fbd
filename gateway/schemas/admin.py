"""Admin API payloads: strict (unknown fields refused), unlike the OpenAI surface."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.evals.gates import EvalReport
from registry.models import Adapter, AdapterVersion
from registry.service.keys import MAX_KEY_DAYS
from registry.tenancy import MAX_LIMIT, MIN_REQUESTS_PER_SECOND
from registry.text_checks import nul_path


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Payload(Strict):
    """What an admin sends (responses are plain Strict: rows SQLite stored before this check
    must still be shown)."""

    @model_validator(mode="after")
    def _no_nul_characters(self) -> Self:
        # PostgreSQL cannot store them: refused here, not a 500 after the checks passed.
        for name, value in self:
            if (where := nul_path(value, name)) is not None:
                raise ValueError(f"{where} must not contain NUL characters")
        return self


def example(payload: dict[str, Any]) -> ConfigDict:
    """Strict config with one example for the OpenAPI page."""
    return ConfigDict(extra="forbid", json_schema_extra={"examples": [payload]})


VERSION_EXAMPLE: dict[str, Any] = {
    "name": "support-bot",
    "version": 2,
    "state": "active",
    "rank": 16,
    "alpha": 32.0,
    "use_rslora": False,
    "target_modules": ["q_proj", "v_proj"],
    "dtype": "bfloat16",
    "size_bytes": 13631488,
    "artifact_sha256": "9f2c" + "0" * 60,
    "card": None,
    "created_by": "admin",
    "created_at": "2026-11-24T10:00:00Z",
}


class ImportAdapter(Payload):
    path: str = Field(
        description="Local PEFT folder under one of LORAPLEX_IMPORT_ROOTS, or s3://bucket/prefix "
        "(folder or .tar/.zip object) in one of LORAPLEX_S3_IMPORT_BUCKETS."
    )
    name: str
    tenant: str = Field(description="The owning tenant (required).")
    # A new adapter's visibility (default private); omitted, a new version keeps the adapter's.
    visibility: Literal["private", "shared"] | None = None
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


class ChangeReason(Payload):
    reason: str | None = Field(None, max_length=500)

    model_config = example({"reason": "regressed on the eval set"})


class EvaluateVersion(Strict):
    reason: str | None = Field(None, max_length=500)
    report: EvalReport | None = Field(
        None,
        description="An eval report from `loraplex eval run` against this exact version: "
        "its response ids must be this gateway's, its gates are judged again here.",
    )

    model_config = example({"reason": "eval suite support-v3 passed", "report": None})

    @model_validator(mode="after")
    def _reason_without_nul(self) -> Self:
        if self.reason is not None and "\x00" in self.reason:
            raise ValueError("reason must not contain NUL characters")
        return self


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

    model_config = example(VERSION_EXAMPLE)

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

    model_config = example(
        {
            "name": "support-bot",
            "tenant": "acme",
            "visibility": "private",
            "base_model": "llama-3-8b",
            "created_at": "2026-11-20T09:00:00Z",
            "versions": [VERSION_EXAMPLE],
        }
    )

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


class TenantLimits(Payload):
    """A tenant's policy. Omitted or null = unlimited; allow_base_model defaults to true."""

    requests_per_second: float | None = Field(
        None, ge=MIN_REQUESTS_PER_SECOND, le=MAX_LIMIT, examples=[5]
    )
    burst: int | None = Field(
        None, gt=0, le=MAX_LIMIT, description="Bucket size for requests_per_second."
    )
    tokens_per_minute: int | None = Field(None, gt=0, le=MAX_LIMIT, examples=[20000])
    max_concurrent: int | None = Field(
        None,
        gt=0,
        le=MAX_LIMIT,
        examples=[8],
        description="Sequences generating at once (a request counts its prompts x n).",
    )
    max_tokens: int | None = Field(None, gt=0, le=MAX_LIMIT, examples=[512])
    allow_base_model: bool | None = Field(None, description="May call the base model itself.")

    model_config = example(
        {"requests_per_second": 5, "tokens_per_minute": 20000, "max_tokens": 512}
    )


class CreateTenant(Payload):
    name: str = Field(examples=["acme"])
    limits: TenantLimits | None = None

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"name": "acme", "limits": {"requests_per_second": 5, "max_tokens": 512}}]
        },
    )


class TenantOut(Strict):
    name: str
    limits: dict[str, Any]
    created_at: datetime

    model_config = example(
        {"name": "acme", "limits": {"max_concurrent": 8}, "created_at": "2026-11-20T09:00:00Z"}
    )


class CreateKey(Payload):
    label: str | None = Field(None, max_length=200, examples=["ci pipeline"])
    expires_at: datetime | None = Field(None, description="Aware UTC time; past → refused.")
    expires_in_days: float | None = Field(
        None, gt=0, le=MAX_KEY_DAYS, allow_inf_nan=False, examples=[90]
    )

    model_config = example({"label": "ci pipeline", "expires_in_days": 90})


KEY_EXAMPLE: dict[str, Any] = {
    "key_id": "k3v7q2m4x6zb",
    "tenant": "acme",
    "label": "ci pipeline",
    "status": "active",
    "created_at": "2026-11-24T10:00:00Z",
    "expires_at": "2027-02-22T10:00:00Z",
    "revoked_at": None,
}


class KeyOut(Strict):
    key_id: str
    tenant: str
    label: str | None
    status: Literal["active", "revoked", "expired"]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    model_config = example(KEY_EXAMPLE)


class IssuedKeyOut(KeyOut):
    key: str = Field(description="The secret. Shown once: only its hash is stored.")

    model_config = example({**KEY_EXAMPLE, "key": "lpx_k3v7q2m4x6zb_" + "x" * 43})


class ShareAdapter(Payload):
    tenant: str = Field(examples=["globex"])

    model_config = example({"tenant": "globex"})


class SharesOut(Strict):
    adapter: str
    tenants: list[str]

    model_config = example({"adapter": "support-bot", "tenants": ["globex", "initech"]})


class BaseModelOut(Strict):
    name: str
    weights_sha256: str
    tokenizer_sha256: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    modules: dict[str, Any]
    served: bool
    created_at: datetime

    model_config = example(
        {
            "name": "llama-3-8b",
            "weights_sha256": "4b1e" + "0" * 60,
            "tokenizer_sha256": "77aa" + "0" * 60,
            "model_type": "llama",
            "hidden_size": 4096,
            "num_layers": 32,
            "num_heads": 32,
            "num_kv_heads": 8,
            "head_dim": 128,
            "vocab_size": 128256,
            "modules": {"q_proj": [4096, 4096], "k_proj": [4096, 1024]},
            "served": True,
            "created_at": "2026-11-20T09:00:00Z",
        }
    )


class RegistryHealthOut(Strict):
    status: str
    database: str
    served_base: str
    served_base_sha256: str
    adapters: int
    # The dtype the engine holds LoRA weights in (safetensors name): registrations whose values
    # it cannot hold are refused. None until known (dtype "auto" before the engine started).
    engine_lora_dtype: str | None

    model_config = example(
        {
            "status": "ok",
            "database": "postgresql",
            "served_base": "llama-3-8b",
            "served_base_sha256": "4b1e" + "0" * 60,
            "adapters": 1204,
            "engine_lora_dtype": "BF16",
        }
    )


class FaultIn(Payload):
    adapter: str
    version: int = Field(gt=0)
    latency_ms: float = Field(0, ge=0, le=600_000)
    error_rate: float = Field(0, ge=0, le=1)

    model_config = example({"adapter": "support-bot", "version": 3, "latency_ms": 400})


class FaultsOut(Strict):
    faults: list[dict[str, Any]]

    model_config = example(
        {"faults": [{"adapter": "support-bot", "version": 3, "latency_ms": 400, "error_rate": 0}]}
    )
