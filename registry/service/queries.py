"""Read-side queries shared by the admin API, rollout and resolution."""

from __future__ import annotations

from sqlalchemy import ColumnElement, Update, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from registry.errors import AdapterNotFound, VersionNotFound
from registry.models import Adapter, AdapterShare, AdapterVersion, BaseModel, Tenant
from registry.states import ADDRESSABLE, SERVABLE, VersionState, Visibility


def usable_by(tenant: str) -> ColumnElement[bool]:
    """SQL condition on Adapter: `tenant` owns it, it is shared with everyone
    (Visibility.SHARED), or it is shared with `tenant` explicitly (adapter_shares). Subqueries,
    not joins: one statement whatever the number of adapters."""
    shared_with = (
        select(AdapterShare.adapter_id)
        .join(Tenant, AdapterShare.tenant_id == Tenant.id)
        .where(Tenant.name == tenant)
    )
    return or_(
        Adapter.tenant.has(Tenant.name == tenant),
        Adapter.visibility == Visibility.SHARED,
        Adapter.id.in_(shared_with),
    )


async def is_shared_with(session: AsyncSession, *, adapter_id: int, tenant_id: int) -> bool:
    """Whether an explicit share gives `tenant_id` use of the adapter (ownership and
    Visibility.SHARED are not considered)."""
    found = await session.scalar(
        select(AdapterShare.id).where(
            AdapterShare.adapter_id == adapter_id, AdapterShare.tenant_id == tenant_id
        )
    )
    return found is not None


async def sqlite_write_lock(session: AsyncSession, no_op: Update) -> bool:
    """On SQLite, take the database's write lock now by running `no_op` (an UPDATE that
    changes nothing, even of no row): SQLite ignores FOR UPDATE and pysqlite opens a
    transaction only at the first write, so reads would not wait for a concurrent writer.
    Other writers then wait (busy_timeout). False, doing nothing, on other databases."""
    if session.get_bind().dialect.name != "sqlite":
        return False
    await session.execute(no_op.execution_options(synchronize_session=False))
    return True


async def lock_adapter(session: AsyncSession, name: str) -> None:
    """Hold adapter `name`'s write lock until the transaction ends. Registrations, retire,
    delete and every rollout operation take it before they read, so racing replicas apply
    one after the other and each decides on what the previous one committed.

    PostgreSQL: the adapter's row lock (none yet for a first registration, where the unique
    name settles the race). SQLite: the database's write lock."""
    no_op = (
        update(Adapter).where(Adapter.name == name).values(rollout_paused=Adapter.rollout_paused)
    )
    if not await sqlite_write_lock(session, no_op):
        await session.execute(select(Adapter.id).where(Adapter.name == name).with_for_update())


async def lock_artifact(session: AsyncSession, digest: str) -> None:
    """Hold the artifact `digest`'s lock until the transaction ends: registering a version
    with those files and deleting the last version that uses them take it, so the delete never
    removes an object a registration found stored and is about to reference. PostgreSQL: a
    transaction-scoped advisory lock on the digest. SQLite: the write lock, which a writing
    transaction holds already."""
    if session.get_bind().dialect.name == "sqlite":
        return
    key = int(digest[:15], 16)  # 60 bits of the sha256: fits a bigint, collisions harmless
    await session.execute(select(func.pg_advisory_xact_lock(key)))


async def find_adapter(
    session: AsyncSession,
    name: str,
    *,
    for_update: bool = False,
    usable_by_tenant: str | None = None,
) -> Adapter | None:
    """The adapter called `name`; with `usable_by_tenant`, None also when that tenant may not
    use it (see `usable_by`)."""
    query = select(Adapter).where(Adapter.name == name)
    if usable_by_tenant is not None:
        query = query.where(usable_by(usable_by_tenant))
    if for_update:
        await lock_adapter(session, name)
        # `of=` keeps the joined tenant/base rows unlocked; populate_existing: what was
        # committed before the lock was ours, not a copy read earlier in the session.
        query = query.with_for_update(of=Adapter).execution_options(populate_existing=True)
    return await session.scalar(query)


async def get_adapter(session: AsyncSession, *, name: str) -> Adapter:
    adapter = await find_adapter(session, name)
    if adapter is None:
        raise AdapterNotFound(f"adapter {name!r} does not exist")
    return adapter


async def list_adapters(
    session: AsyncSession, *, tenant: str | None = None, include_shared: bool = True
) -> list[Adapter]:
    """All adapters (tenant None), or those a tenant owns plus, with `include_shared`, those it
    may use: shared with everyone or explicitly with it (see `usable_by`)."""
    query = select(Adapter).order_by(Adapter.name)
    if tenant is not None:
        query = query.where(
            usable_by(tenant) if include_shared else Adapter.tenant.has(Tenant.name == tenant)
        )
    return list((await session.scalars(query)).all())


async def list_versions(
    session: AsyncSession, *, name: str, include_deleted: bool = True
) -> list[AdapterVersion]:
    adapter = await get_adapter(session, name=name)
    query = (
        select(AdapterVersion)
        .where(AdapterVersion.adapter_id == adapter.id)
        .order_by(AdapterVersion.version)
    )
    if not include_deleted:
        query = query.where(AdapterVersion.state != VersionState.DELETED)
    return list((await session.scalars(query)).all())


async def get_version(
    session: AsyncSession, *, name: str, version: int, for_update: bool = False
) -> AdapterVersion:
    query = (
        select(AdapterVersion)
        .join(AdapterVersion.adapter)
        .where(Adapter.name == name, AdapterVersion.version == version)
    )
    if for_update:
        # The adapter's lock first, as rollout operations take it: a retire or delete then
        # sees a canary, shadow or fallback started a moment before, and the other way round.
        await lock_adapter(session, name)
        query = query.with_for_update(of=AdapterVersion).execution_options(populate_existing=True)
    row = await session.scalar(query)
    if row is None:
        raise VersionNotFound(f"adapter {name!r} has no version {version}")
    return row


async def version_address(session: AsyncSession, *, version_id: int) -> tuple[str, int] | None:
    """The adapter name and version number of version row `version_id`, whatever its state
    (retired and deleted versions keep their rows); None when no such row exists."""
    row = (
        await session.execute(
            select(Adapter.name, AdapterVersion.version)
            .join(Adapter, AdapterVersion.adapter_id == Adapter.id)
            .where(AdapterVersion.id == version_id)
        )
    ).first()
    return None if row is None else (row[0], row[1])


async def current_version(session: AsyncSession, adapter: Adapter) -> AdapterVersion | None:
    """The version `name` resolves to: the rollout's stable pointer when set and servable,
    otherwise the newest servable version."""
    servable = (
        select(AdapterVersion)
        .where(AdapterVersion.adapter_id == adapter.id, AdapterVersion.state.in_(SERVABLE))
        .order_by(AdapterVersion.version.desc())
    )
    if adapter.stable_version is not None:
        pinned = await session.scalar(
            servable.where(AdapterVersion.version == adapter.stable_version)
        )
        if pinned is not None:
            return pinned
    return await session.scalar(servable.limit(1))


async def next_version_number(session: AsyncSession, adapter_id: int) -> int:
    # Deleted versions stay as rows, so max()+1 never reuses a number.
    highest = await session.scalar(
        select(func.max(AdapterVersion.version)).where(AdapterVersion.adapter_id == adapter_id)
    )
    return int(highest or 0) + 1


async def artifact_references(
    session: AsyncSession, digest: str, *, excluding_id: int | None = None
) -> int:
    """Live (non-deleted) versions whose artifact is `digest`."""
    query = select(func.count(AdapterVersion.id)).where(
        AdapterVersion.artifact_sha256 == digest, AdapterVersion.state != VersionState.DELETED
    )
    if excluding_id is not None:
        query = query.where(AdapterVersion.id != excluding_id)
    return int(await session.scalar(query) or 0)


async def rank_profile(
    session: AsyncSession, *, base_model: str
) -> list[tuple[int, tuple[str, ...], int]]:
    """(rank, target modules, how many) over the versions that may take traffic on
    `base_model` (servable or shadow): what the engine will be asked to hold. Modules are
    sorted; one rank per version (the gate refuses PEFT's per-module rank_pattern)."""
    query = (
        select(AdapterVersion.rank, AdapterVersion.target_modules)
        .join(Adapter, AdapterVersion.adapter_id == Adapter.id)
        .join(BaseModel, Adapter.base_model_id == BaseModel.id)
        .where(BaseModel.name == base_model, AdapterVersion.state.in_(ADDRESSABLE))
    )
    counts: dict[tuple[int, tuple[str, ...]], int] = {}
    for rank, modules in (await session.execute(query)).all():
        key = (int(rank), tuple(sorted(str(m) for m in modules or ())))
        counts[key] = counts.get(key, 0) + 1
    return [(rank, modules, n) for (rank, modules), n in sorted(counts.items())]
