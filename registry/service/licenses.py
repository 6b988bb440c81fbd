"""Licence tags enforced (seed §6 "partner data: one customer only", (c) licence-tag
enforcement): a version trained on PARTNER_ONLY data (its card's `licenses`, or the `license`
of any dataset it lists) serves its owner only. It is never registered into an adapter shared
with every tenant or with named ones, and an adapter serving such a version is never shared.
Both checks run under the adapter's lock, so a registration and a share racing on one adapter
decide one after the other."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from registry.card import AdaptationCard, LicenseTag
from registry.compat.problems import Problem, ProblemCode
from registry.errors import PartnerOnlyData
from registry.models import Adapter, AdapterShare, AdapterVersion
from registry.states import VersionState, Visibility

PARTNER_ONLY = LicenseTag.PARTNER_ONLY.value
OUT_OF_SERVICE = (VersionState.RETIRED, VersionState.DELETED)


def partner_only(card: AdaptationCard | Mapping[str, Any] | None) -> bool:
    """Whether the card marks the version PARTNER_ONLY (itself or any dataset it lists)."""
    if card is None:
        return False
    stored = card.model_dump(mode="json") if isinstance(card, AdaptationCard) else card
    licenses = stored.get("licenses") or []
    datasets = stored.get("datasets") or []
    return PARTNER_ONLY in licenses or any(
        isinstance(d, Mapping) and d.get("license") == PARTNER_ONLY for d in datasets
    )


async def audience_problems(
    session: AsyncSession,
    adapter: Adapter | None,
    visibility: Visibility | None,
    card: AdaptationCard | None,
) -> list[Problem]:
    """Why a new version with `card` may not join `adapter` (None: a new adapter of
    `visibility`): PARTNER_ONLY data served to more than its owner."""
    if not partner_only(card):
        return []
    name = "the new adapter" if adapter is None else f"adapter {adapter.name!r}"
    if (adapter.visibility if adapter is not None else visibility) == Visibility.SHARED:
        audience = "every tenant"
    elif adapter is not None and (shares := await _share_count(session, adapter)):
        audience = f"{shares} other tenant(s)"
    else:
        return []
    return [
        Problem(
            ProblemCode.LICENSE_PARTNER_ONLY,
            f"the card marks this version PARTNER_ONLY (one customer only), and {name} is "
            f"served to {audience}",
        )
    ]


async def refuse_sharing_partner_data(session: AsyncSession, adapter: Adapter) -> None:
    """Raise PartnerOnlyData (an InvalidInput) when a version of `adapter` still in service
    is PARTNER_ONLY."""
    rows = await session.execute(
        select(AdapterVersion.version, AdapterVersion.card)
        .where(AdapterVersion.adapter_id == adapter.id)
        .where(AdapterVersion.state.not_in(OUT_OF_SERVICE))
        .order_by(AdapterVersion.version)
    )
    held = [f"v{version}" for version, card in rows if partner_only(card)]
    if held:
        raise PartnerOnlyData(
            f"adapter {adapter.name!r} serves versions trained on PARTNER_ONLY data "
            f"({', '.join(held)}): it serves its owner only (retire them to share it)"
        )


async def _share_count(session: AsyncSession, adapter: Adapter) -> int:
    query = select(func.count()).where(AdapterShare.adapter_id == adapter.id)
    return int(await session.scalar(query) or 0)
