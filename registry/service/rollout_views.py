"""Reading rollout state: one adapter's `RolloutView`, the views of some or all adapters, the
rollout generation and stamps, and the rollout history.

Polling (gateway replicas): when `rollout_generation` (the newest stamp) moved, or anything in
the registry changed, read `rollout_stamps` and rebuild the views of the adapters whose stamp
differs from the one last seen (`list_rollouts(names=...)`). A stamp is the writer's clock,
but each write makes its adapter's stamp differ from before (strictly increasing per adapter),
so comparing stamps per adapter misses nothing: neither a writer whose clock lags nor a
transaction that stamped before a faster one committed. Reads here never commit and always
re-read rows (populate_existing), so a long-lived session sees other writers' changes.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from sqlalchemy import ColumnElement, Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from registry.errors import AdapterNotFound
from registry.models import Adapter, AdapterVersion, RolloutEvent
from registry.rollout import RolloutView, card_limits
from registry.service.queries import lock_adapter
from registry.states import SERVABLE

NAMES_PER_QUERY = 500  # well under SQLite's and PostgreSQL's bound parameter limits
FALLBACK_ACTIONS = ("stable_fallback", "stable_restore")  # rollout_events.action


def adapter_query(name: str, *, for_update: bool = False) -> Select[Adapter]:
    query = select(Adapter).where(Adapter.name == name).execution_options(populate_existing=True)
    # `of=`: lock the adapter row only, not the joined tenant and base rows.
    return query.with_for_update(of=Adapter) if for_update else query


async def load_adapter(session: AsyncSession, name: str, *, for_update: bool = False) -> Adapter:
    """`for_update`: hold the adapter's write lock until the transaction ends, so racing
    replicas apply one after the other and each decides on what the previous one wrote."""
    if for_update:
        await lock_adapter(session, name)
    adapter = await session.scalar(adapter_query(name, for_update=for_update))
    if adapter is None:
        raise AdapterNotFound(f"adapter {name!r} does not exist")
    return adapter


async def version_row(
    session: AsyncSession, adapter: Adapter, version: int, *, for_update: bool = False
) -> AdapterVersion | None:
    query = (
        select(AdapterVersion)
        .where(AdapterVersion.adapter_id == adapter.id, AdapterVersion.version == version)
        .execution_options(populate_existing=True)
    )
    if for_update:
        query = query.with_for_update(of=AdapterVersion)
    return await session.scalar(query)


async def stable_below(
    session: AsyncSession, adapter: Adapter, version: int
) -> AdapterVersion | None:
    """The stable a candidate `version` (canary or shadow) is compared with: the current
    stable, or the newest servable version below `version` when the candidate itself is what
    `name` serves now (an adapter registered before new versions pinned the stable, or whose
    stable was retired). A stable newer than `version` is returned as is: the caller refuses
    it by name."""
    current = await stable_row(session, adapter)
    if current is not None and (current.version != version or adapter.stable_version == version):
        return current
    return await session.scalar(
        select(AdapterVersion)
        .where(
            AdapterVersion.adapter_id == adapter.id,
            AdapterVersion.version < version,
            AdapterVersion.state.in_(SERVABLE),
        )
        .order_by(AdapterVersion.version.desc())
        .limit(1)
    )


async def stable_row(session: AsyncSession, adapter: Adapter) -> AdapterVersion | None:
    """What `name` serves outside the canary: the stable pointer when servable, else the newest
    servable version (the same rule as queries.current_version, re-reading rows)."""
    servable = (
        select(AdapterVersion)
        .where(AdapterVersion.adapter_id == adapter.id, AdapterVersion.state.in_(SERVABLE))
        .order_by(AdapterVersion.version.desc())
        .limit(1)
        .execution_options(populate_existing=True)
    )
    if adapter.stable_version is not None:
        pinned = await session.scalar(
            servable.where(AdapterVersion.version == adapter.stable_version)
        )
        if pinned is not None:
            return pinned
    return await session.scalar(servable)


def rollback_target(adapter: Adapter, stable: AdapterVersion | None) -> str:
    """Where a breaching stable goes: the admin-set path, else the stable card's, else base."""
    if adapter.rollback_path:
        return adapter.rollback_path
    card_path = (stable.card or {}).get("rollback_path") if stable is not None else None
    return str(card_path) if card_path else "base"


def arms_fallback(adapter: Adapter, stable: AdapterVersion | None) -> bool:
    """Whether a breaching stable moves to its rollback path without an operator. Only when
    someone asked for it: an admin-set path, or a stable card that declares rollback triggers
    or names a path. The implicit base model is for a manual `rollout rollback`: silently
    swapping a tenant's fine-tune for the bare base is a change the operator opts into."""
    if adapter.rollback_path:
        return True
    card = (stable.card or {}) if stable is not None else {}
    return card.get("rollback") is not None or card.get("rollback_path") not in (None, "base")


async def build_view(session: AsyncSession, adapter: Adapter) -> RolloutView:
    stable = await stable_row(session, adapter)
    canary = shadow = None
    if adapter.canary_version is not None:
        canary = await version_row(session, adapter, adapter.canary_version)
    if adapter.shadow_version is not None:
        shadow = await version_row(session, adapter, adapter.shadow_version)
    return RolloutView(
        name=adapter.name,
        tenant=adapter.tenant.name,
        base_model=adapter.base_model.name,
        base_sha256=adapter.base_model.weights_sha256,
        stable_version=stable.version if stable is not None else None,
        stable_version_id=stable.id if stable is not None else None,
        canary_version=canary.version if canary is not None else None,
        canary_version_id=canary.id if canary is not None else None,
        canary_percent=(adapter.canary_percent or 0) if canary is not None else 0,
        shadow_version=shadow.version if shadow is not None else None,
        shadow_version_id=shadow.id if shadow is not None else None,
        shadow_percent=(adapter.shadow_percent or 0) if shadow is not None else 0,
        paused=adapter.rollout_paused,
        stage=adapter.rollout_stage,
        rollback_target=rollback_target(adapter, stable),
        active_target=adapter.active_target,
        auto_fallback=arms_fallback(adapter, stable),
        rolled_back_version=adapter.rolled_back_version,
        rolled_back_at=adapter.rolled_back_at,
        updated_at=adapter.rollout_updated_at,
        stable_card=card_limits(stable.card) if stable is not None else None,
        canary_card=card_limits(canary.card) if canary is not None else None,
        shadow_card=card_limits(shadow.card) if shadow is not None else None,
        threshold_override=adapter.rollout_thresholds,
        fallback_event_id=await session.scalar(
            select(func.max(RolloutEvent.id)).where(
                RolloutEvent.adapter_id == adapter.id,
                RolloutEvent.action.in_(FALLBACK_ACTIONS),
            )
        ),
    )


async def rollout_status(session: AsyncSession, *, name: str) -> RolloutView:
    """Raises AdapterNotFound. Any adapter has a view (no rollout: stable = current version)."""
    return await build_view(session, await load_adapter(session, name))


async def list_rollouts(
    session: AsyncSession,
    *,
    since: datetime | None = None,
    names: Collection[str] | None = None,
) -> list[RolloutView]:
    """Views of the adapters a rollout write has touched (ever, at or after `since`, or only
    those `names`), by name. Adapters never touched route as `resolve_adapter(name)` says, so
    they are left out."""
    if names is not None:
        wanted = sorted(names)
        views: list[RolloutView] = []
        for start in range(0, len(wanted), NAMES_PER_QUERY):
            chunk = wanted[start : start + NAMES_PER_QUERY]
            views += await _views(session, since, Adapter.name.in_(chunk))
        return views
    return await _views(session, since, None)


async def _views(
    session: AsyncSession, since: datetime | None, where: ColumnElement[bool] | None
) -> list[RolloutView]:
    query = (
        select(Adapter)
        .where(Adapter.rollout_updated_at.is_not(None))
        .order_by(Adapter.name)
        .execution_options(populate_existing=True)
    )
    if since is not None:
        query = query.where(Adapter.rollout_updated_at >= since)
    if where is not None:
        query = query.where(where)
    return [await build_view(session, adapter) for adapter in await session.scalars(query)]


async def rollout_stamps(session: AsyncSession) -> dict[str, datetime]:
    """Every touched adapter's stamp, by name (one read of two columns)."""
    rows = await session.execute(
        select(Adapter.name, Adapter.rollout_updated_at).where(
            Adapter.rollout_updated_at.is_not(None)
        )
    )
    return {name: stamp for name, stamp in rows if stamp is not None}


async def rollout_generation(session: AsyncSession) -> datetime | None:
    """The newest rollout write anywhere (one indexed max()); None before the first."""
    return await session.scalar(select(func.max(Adapter.rollout_updated_at)))


async def list_rollout_events(
    session: AsyncSession, *, name: str, limit: int = 100
) -> list[RolloutEvent]:
    """One adapter's rollout history, newest first. Raises AdapterNotFound."""
    adapter = await load_adapter(session, name)
    query = (
        select(RolloutEvent)
        .where(RolloutEvent.adapter_id == adapter.id)
        .order_by(RolloutEvent.id.desc())
        .limit(limit)
    )
    return list((await session.scalars(query)).all())
