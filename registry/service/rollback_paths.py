"""Validating a rollback path (seed §1), a card's or one an admin sets on the adapter: the
fallback must exist, be servable, run on the same base, be usable by the same tenant, and
following fallbacks must never lead back here.

`base` is always valid. `name@N` pins a version (rolling back to one's own earlier version is
the usual case); a bare `name` follows that adapter's current version, and so can form cycles.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from registry.compat.problems import Problem, ProblemCode
from registry.errors import InvalidName, VersionNotFound
from registry.models import Adapter, AdapterVersion, BaseModel, Tenant
from registry.naming import AdapterAddress, parse_address
from registry.service.queries import current_version, find_adapter, get_version, is_shared_with
from registry.states import SERVABLE, Visibility

MAX_HOPS = 32


async def rollback_path_problems(
    session: AsyncSession,
    *,
    target: str,
    name: str,
    tenant: Tenant,
    base: BaseModel,
    adapter_level: bool = False,
) -> list[Problem]:
    """Every reason `target` cannot be the rollback path of adapter `name` (empty: it can).
    `adapter_level`: the path applies to the adapter as a whole (set by an admin, or followed
    at fallback time), so a direct `name@N` is fine (an earlier version ends the chain) but
    any later return to `name`, pinned or not, is a cycle."""
    if target == "base":
        return []

    def invalid(why: str) -> list[Problem]:
        return [Problem(ProblemCode.ROLLBACK_PATH_INVALID, f"rollback_path {target!r} {why}")]

    try:
        address = parse_address(target)
    except InvalidName as exc:
        return invalid(f"is not an adapter address: {exc.message}")
    if address.name == name and address.version is None:
        return invalid("points at the adapter itself")
    fallback = await find_adapter(session, address.name)
    if fallback is None:
        return invalid("names an adapter that does not exist")
    if fallback.base_model_id != base.id:
        return invalid(f"runs on base {fallback.base_model.name!r}, not {base.name!r}")
    if not await _usable(session, fallback, tenant):
        return invalid("belongs to another tenant")
    node = await resolve_target(session, address)
    if node is None:
        return invalid("has no servable version")
    if adapter_level and node.adapter.name == name:
        # An earlier version of this adapter ends the chain: only the stable falls back, and
        # the path being set is that version's own.
        return []
    seen = {node.id}
    for _ in range(MAX_HOPS):
        # The path that version would fall back along: its adapter's admin-set one, else its
        # card's (registry.service.rollout follows the same order).
        path = node.adapter.rollback_path or (node.card or {}).get("rollback_path", "base")
        if path == "base":
            return []
        try:
            step = parse_address(path)
        except InvalidName:
            return []  # a stored card was validated when registered; nothing to follow
        if step.name == name and (step.version is None or adapter_level):
            return invalid(f"leads back to {name!r} (via {node.adapter.name}@{node.version})")
        following = await resolve_target(session, step)
        if following is None:
            return []  # a broken chain ends at the base
        if following.id in seen:
            return invalid(f"is part of a cycle through {following.adapter.name}")
        seen.add(following.id)
        node = following
    return invalid(f"chain is longer than {MAX_HOPS} hops")


async def _usable(session: AsyncSession, adapter: Adapter, tenant: Tenant) -> bool:
    # An explicit share counts too. Unsharing later does not revisit cards that name the
    # adapter, so whoever follows a rollback path at serve time must resolve it in the tenant's
    # scope (resolve_adapter(tenant=...)) rather than trust this check.
    if adapter.tenant_id == tenant.id or adapter.visibility == Visibility.SHARED:
        return True
    return await is_shared_with(session, adapter_id=adapter.id, tenant_id=tenant.id)


async def resolve_target(session: AsyncSession, address: AdapterAddress) -> AdapterVersion | None:
    """The servable version a rollback address reaches (a bare name: that adapter's current
    version), or None. No tenant scope: callers check usability separately."""
    if address.version is not None:
        try:
            row = await get_version(session, name=address.name, version=address.version)
        except VersionNotFound:
            return None
        return row if row.state in SERVABLE else None
    adapter = await find_adapter(session, address.name)
    return None if adapter is None else await current_version(session, adapter)
