"""Shadow mode (seed step 8), the writes: a candidate version gets a copy of the requests that
the stable serves for a share of the callers; its output is compared and discarded, so users
never see it. One transaction each, under the adapter's write lock, with a rollout event and an
audit row (`log_event`, which also stamps the adapter for polling replicas).

States: start moves the candidate evaluated → shadow; stop returns it to evaluated (mirroring
judges nothing: the operator reads the divergence and latency, then starts a canary, retires
or rolls it back). Starting a canary of the shadow version ends the shadow
(registry.service.rollout.start_rollout), and so does a completed rollout that leaves the
shadow no newer than the stable. Like a canary, a shadow pins the stable it is compared with.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from registry.errors import (
    InvalidInput,
    InvalidStateTransition,
    RegistryConflict,
    VersionNotFound,
)
from registry.models import Adapter, AdapterVersion
from registry.rollout import RolloutView
from registry.service.lifecycle import move_state
from registry.service.rollout_log import log_event
from registry.service.rollout_views import build_view, load_adapter, stable_below, version_row
from registry.states import VersionState


async def start_shadow(
    session: AsyncSession,
    *,
    name: str,
    version: int,
    percent: int,
    actor: str,
    reason: str | None = None,
) -> RolloutView:
    """Mirror `percent` % (1-100) of the stable's callers to `version` (evaluated, or already
    the shadow: then only its share changes). `version` must be newer than the stable and not
    the running canary; another running shadow must be stopped first. Raises AdapterNotFound,
    VersionNotFound, InvalidInput, RegistryConflict or InvalidStateTransition."""
    if isinstance(percent, bool) or not isinstance(percent, int) or not 1 <= percent <= 100:
        raise InvalidInput(f"a shadow takes 1 to 100 % of the stable's callers, not {percent}")
    adapter = await load_adapter(session, name, for_update=True)
    if adapter.canary_version == version:
        raise RegistryConflict(f"{name}@{version} is the running canary; its users see it already")
    if adapter.shadow_version not in (None, version):
        raise RegistryConflict(
            f"{name}@{adapter.shadow_version} is already in shadow at {adapter.shadow_percent} %;"
            " stop it first"
        )
    row = await version_row(session, adapter, version, for_update=True)
    if row is None:
        raise VersionNotFound(f"adapter {name!r} has no version {version}")
    if row.state not in (VersionState.EVALUATED, VersionState.SHADOW):
        raise InvalidStateTransition(
            f"{name}@{version} is {row.state.value}; a shadow starts from evaluated"
        )
    stable = await stable_below(session, adapter, version)
    if stable is None:
        raise InvalidStateTransition(
            f"{name} has no servable version below {version} whose traffic it could mirror"
        )
    if version <= stable.version:
        raise InvalidInput(f"{name}@{version} is not newer than the stable {name}@{stable.version}")
    previous = adapter.shadow_percent if adapter.shadow_version == version else None
    if previous == percent and adapter.stable_version == stable.version:
        view = await build_view(session, adapter)
        await session.commit()  # nothing to change; releases the row lock
        return view
    if row.state != VersionState.SHADOW:
        move_state(row, VersionState.SHADOW)
    # Pinned, as for a canary: registering a newer version must not change what is compared.
    adapter.stable_version = stable.version
    adapter.shadow_version = version
    adapter.shadow_percent = percent
    log_event(
        session,
        adapter,
        "shadow_start" if previous is None else "shadow_update",
        actor=actor,
        from_version=stable.version,
        to_version=version,
        percent=percent,
        reason=reason,
        details=None if previous is None else {"previous_percent": previous},
    )
    await session.commit()
    return await build_view(session, adapter)


async def stop_shadow(
    session: AsyncSession, *, name: str, actor: str, reason: str | None = None
) -> RolloutView:
    """Stop mirroring; the candidate returns to evaluated. Raises AdapterNotFound, or
    InvalidStateTransition when no shadow runs."""
    adapter = await load_adapter(session, name, for_update=True)
    if adapter.shadow_version is None:
        raise InvalidStateTransition(f"{name} has no shadow running")
    row = await version_row(session, adapter, adapter.shadow_version, for_update=True)
    end_shadow(session, adapter, actor=actor, reason=reason, state=row)
    await session.commit()
    return await build_view(session, adapter)


def end_shadow(
    session: AsyncSession,
    adapter: Adapter,
    *,
    actor: str,
    reason: str | None,
    state: AdapterVersion | None,
) -> None:
    """Clear the shadow pointer and log it, in the caller's transaction. `state`: the shadow's
    row, moved back to evaluated; None when the caller moves it itself (a canary start)."""
    version, percent = adapter.shadow_version, adapter.shadow_percent
    if state is not None and state.state == VersionState.SHADOW:
        move_state(state, VersionState.EVALUATED)
    adapter.shadow_version = None
    adapter.shadow_percent = None
    log_event(
        session,
        adapter,
        "shadow_stop",
        actor=actor,
        from_version=adapter.stable_version,
        to_version=version,
        percent=percent,
        reason=reason,
    )
