"""The gateway's handle on the registry: database, artifact store and the served base's identity.

Opened before the engine starts: the served base is fingerprinted (sha256 over its weights,
tokenizer fingerprint, dims) and pinned in the registry under its served name. If that name was
registered with other weights, start-up is refused: adapters trained for one base never run on
another, even one bit apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from gateway.settings import Settings
from kernels.page_groups import DemandEntry
from registry import service
from registry.compat import (
    BaseModelFingerprint,
    EngineLimits,
    fingerprint_base_model,
    safetensors_dtype,
)
from registry.db import make_engine, make_session_factory, migrate
from registry.errors import (
    AdapterNotFound,
    AdapterRejected,
    DuplicateTenant,
    InvalidApiKey,
    RegistryConflict,
    TenantNotFound,
)
from registry.models import ApiKey
from registry.states import Visibility
from registry.store.base import ArtifactStore
from registry.store.s3 import open_artifact_store
from registry.tenancy import key_id_for

logger = logging.getLogger(__name__)
SYSTEM_ACTOR = "system"


@dataclass
class RegistryRuntime:
    db: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    store: ArtifactStore
    base_name: str
    base: BaseModelFingerprint
    max_lora_rank: int
    # The dtype the engine holds LoRA weights in (a safetensors name): the settings' explicit
    # dtype until the engine has started and resolved it (None for "auto" until then).
    engine_dtype: str | None = None
    # Started in demo mode: the start-up key is the demo key (labelled so, see ensure_start_key).
    demo: bool = False

    def limits(self) -> EngineLimits:
        return EngineLimits(max_lora_rank=self.max_lora_rank, dtype=self.engine_dtype)

    async def close(self) -> None:
        await self.db.dispose()


async def open_registry(settings: Settings, base_path: Path, base_name: str) -> RegistryRuntime:
    """Migrate, connect, fingerprint and pin the served base; outside demo mode, revoke the
    keys demo mode issued. Raises BaseModelMismatch."""
    url = settings.resolved_database_url()
    await migrate(url)
    db = make_engine(url)
    sessions = make_session_factory(db)
    try:
        fingerprint = await asyncio.to_thread(fingerprint_base_model, base_path)
        async with sessions() as session:
            await service.register_base_model(
                session, name=base_name, fingerprint=fingerprint, actor=SYSTEM_ACTOR
            )
    except BaseException:
        await db.dispose()
        raise
    logger.info(
        "registry at %s; served base %s sha256 %s",
        url.split("@")[-1],
        base_name,
        fingerprint.weights_sha256[:12],
    )
    store = open_artifact_store(
        settings.artifact_store or settings.resolved_artifact_dir(),
        cache_dir=settings.resolved_artifact_dir(),
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
    )
    runtime = RegistryRuntime(
        db,
        sessions,
        store,
        base_name,
        fingerprint,
        settings.max_lora_rank,
        safetensors_dtype(settings.dtype),
        demo=settings.demo,
    )
    if not settings.demo:
        try:
            await revoke_demo_keys(runtime, keep=settings.import_api_key)
        except BaseException:
            await db.dispose()
            raise
    return runtime


async def ensure_tenant(runtime: RegistryRuntime, name: str) -> None:
    """The tenant exists afterwards, whether this start or a replica starting with it made it."""
    async with runtime.sessions() as session:
        try:
            await service.get_tenant(session, name=name)
        except TenantNotFound:
            # DuplicateTenant: a replica starting at the same moment created it first
            with contextlib.suppress(DuplicateTenant):
                await service.create_tenant(session, name=name, actor=SYSTEM_ACTOR)


async def import_adapter_dir(runtime: RegistryRuntime, folder: Path, tenant: str) -> list[str]:
    """Register each PEFT subfolder not yet in the registry, through the full gate.

    Names already registered are left alone, so restarts never mint new versions. A refused
    folder is logged with every reason and skipped; the rest still import.
    """
    if not folder.is_dir():
        logger.warning("adapter import folder %s does not exist", folder)
        return []
    await ensure_tenant(runtime, tenant)
    imported = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        async with runtime.sessions() as session:
            try:
                await service.get_adapter(session, name=sub.name)
                continue
            except AdapterNotFound:
                pass
            try:
                await service.register_adapter_version(
                    session,
                    store=runtime.store,
                    artifact_dir=sub,
                    name=sub.name,
                    tenant=tenant,
                    served_base=runtime.base,
                    max_lora_rank=runtime.max_lora_rank,
                    engine_dtype=runtime.engine_dtype,
                    actor=SYSTEM_ACTOR,
                    visibility=Visibility.PRIVATE,
                )
            except RegistryConflict:
                # A replica starting with the same folder registered it between the lookup
                # and the insert: the name is registered, which is what importing means.
                continue
            except AdapterRejected as exc:
                logger.warning("not importing %s: %s", sub.name, exc.message)
                continue
        imported.append(sub.name)
    if imported:
        logger.info("imported %d adapters for tenant %s from %s", len(imported), tenant, folder)
    return imported


async def adapter_demand(runtime: RegistryRuntime) -> tuple[DemandEntry, ...]:
    """The registered adapters the engine may be asked to hold, as the paged pool's demand
    profile (kernels.page_groups): how its bytes are split between layer groups."""
    async with runtime.sessions() as session:
        profile = await service.rank_profile(session, base_model=runtime.base_name)
    return tuple(DemandEntry(rank, modules, count) for rank, modules, count in profile)


# Labels of the keys start-up issues. A demo key is a well-known or printed secret: outside
# demo mode it must not keep reaching the registry (revoke_demo_keys).
DEMO_KEY_LABEL = "demo"
IMPORT_KEY_LABEL = "import"
DEMO_OFF_REASON = "demo mode is off"


async def revoke_demo_keys(runtime: RegistryRuntime, *, keep: SecretStr | None) -> list[str]:
    """Revoke every active key start-up issued as a demo key; returns their ids.

    Versions before IMPORT_KEY_LABEL labelled LORAPLEX_IMPORT_API_KEY's key "demo" as well:
    the configured import key (`keep`) stays. Keys an admin labelled "demo" are not start-up's
    (created_by is the admin) and stay too."""
    kept = key_id_for(keep.get_secret_value()) if keep is not None else None
    async with runtime.sessions() as session:
        query = select(ApiKey.key_id).where(
            ApiKey.label == DEMO_KEY_LABEL,
            ApiKey.created_by == SYSTEM_ACTOR,
            ApiKey.revoked_at.is_(None),
        )
        found = [key_id for key_id in (await session.scalars(query)).all() if key_id != kept]
        for key_id in found:
            row = await service.revoke_api_key(
                session, key_id=key_id, actor=SYSTEM_ACTOR, reason=DEMO_OFF_REASON
            )
            logger.warning(
                "demo mode is off: revoked demo key %s of tenant %s", key_id, row.tenant.name
            )
    return found


async def ensure_start_key(runtime: RegistryRuntime, tenant: str, chosen: SecretStr | None) -> str:
    """A key for `tenant` at start-up: the operator's chosen one (registered once, reused on
    later starts), else a fresh random key each start (demo mode). Labelled as the demo key in
    demo mode, as the import key otherwise."""
    label, variable = (
        (DEMO_KEY_LABEL, "LORAPLEX_DEMO_API_KEY")
        if runtime.demo
        else (IMPORT_KEY_LABEL, "LORAPLEX_IMPORT_API_KEY")
    )
    foreign = f"{variable} belongs to another tenant than {tenant!r}: revoke it or choose another"
    await ensure_tenant(runtime, tenant)
    async with runtime.sessions() as session:
        if chosen is not None:
            plaintext = chosen.get_secret_value()
            try:
                principal = await service.authenticate_api_key(session, presented=plaintext)
            except InvalidApiKey as exc:
                if exc.reason in ("revoked", "expired"):
                    raise ValueError(f"{variable} was {exc.reason}: choose another") from None
                principal = None
            if principal is not None:
                if principal.tenant != tenant:
                    raise ValueError(foreign)
                return plaintext
            try:
                await service.create_api_key(
                    session,
                    tenant=tenant,
                    actor=SYSTEM_ACTOR,
                    label=label,
                    plaintext=plaintext,
                )
            except RegistryConflict:
                # The same chosen key, registered by a replica starting at the same moment
                # (its key id is taken): it must now authenticate as this tenant's.
                principal = await service.authenticate_api_key(session, presented=plaintext)
                if principal.tenant != tenant:
                    raise ValueError(foreign) from None
            return plaintext
        issued = await service.create_api_key(
            session, tenant=tenant, actor=SYSTEM_ACTOR, label=label
        )
    return issued.plaintext
