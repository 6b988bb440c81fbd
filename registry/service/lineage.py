"""Lineage read from Adaptation Cards: the adapter versions a dataset went into
(`datasets[].sha256`), so that a dataset withdrawn (a partner's contract ended, consent
revoked, contamination found) leads to every version trained on it (seed §6 and (a)12); and the
versions made from another's weights (stacks: `training.stack_of`; truncations:
`training.truncated_from`), which keep serving its weights after it is retired."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import String, cast, select
from sqlalchemy.ext.asyncio import AsyncSession

from registry.errors import InvalidInput
from registry.models import Adapter, AdapterVersion, Tenant
from registry.states import VersionState, Visibility

SHA256 = re.compile(r"(?:sha256:)?([0-9a-f]{64})")


@dataclass(frozen=True)
class TrainedOn:
    """One adapter version whose card lists the dataset, with what the card says of it."""

    adapter: str
    tenant: str
    version: int
    state: VersionState
    visibility: Visibility
    dataset_name: str
    dataset_license: str | None
    stable_version: int | None  # the adapter's pinned stable (None: its newest serves)


def dataset_digest(value: str) -> str:
    """A dataset's sha256 as cards store it (64 lowercase hex digits), from that or with a
    `sha256:` prefix, in either case. Raises InvalidInput."""
    match = SHA256.fullmatch(value.strip().lower())
    if match is None:
        raise InvalidInput("a dataset is named by its sha256: 64 hex digits")
    return match[1]


async def versions_trained_on(session: AsyncSession, *, dataset_sha256: str) -> list[TrainedOn]:
    """Every adapter version whose card lists the dataset, in every state (deleted ones too:
    lineage is also the record of what was served), by adapter name then version.

    The database keeps only the cards whose text holds the digest (JSON on SQLite, JSONB on
    PostgreSQL, both readable as text), which are then read properly: a digest elsewhere in a
    card (its base_sha256, an eval's name) is no dataset."""
    digest = dataset_digest(dataset_sha256)
    rows = await session.execute(
        select(
            AdapterVersion.card,
            AdapterVersion.version,
            AdapterVersion.state,
            Adapter.name,
            Adapter.visibility,
            Adapter.stable_version,
            Tenant.name,
        )
        .join(Adapter, AdapterVersion.adapter_id == Adapter.id)
        .join(Tenant, Adapter.tenant_id == Tenant.id)
        .where(cast(AdapterVersion.card, String).contains(digest))
        .order_by(Adapter.name, AdapterVersion.version)
    )
    found: list[TrainedOn] = []
    for card, version, state, adapter, visibility, stable, tenant in rows:
        for dataset in _datasets(card):
            if _digest_of(dataset) == digest:
                license_tag = dataset.get("license")
                found.append(
                    TrainedOn(
                        adapter=adapter,
                        tenant=tenant,
                        version=version,
                        state=state,
                        visibility=visibility,
                        dataset_name=str(dataset.get("name", "")),
                        dataset_license=None if license_tag is None else str(license_tag),
                        stable_version=stable,
                    )
                )
                break  # a card listing the dataset twice is one version
    return found


@dataclass(frozen=True)
class DerivedVersion:
    """One adapter version made from the weights of the version asked about."""

    adapter: str
    tenant: str
    version: int
    state: VersionState
    how: str  # "stack" (it is one component) or "truncation"


async def versions_derived_from(
    session: AsyncSession, *, name: str, version: int
) -> list[DerivedVersion]:
    """Every version whose card records it was made from `name@version`'s weights, in every
    state, by adapter name then version. As for datasets, the database keeps the cards whose
    text holds the address and each is then read: `a@1` is not `a@10` nor `ba@1`."""
    address = f"{name}@{version}"
    rows = await session.execute(
        select(AdapterVersion.card, AdapterVersion.version, AdapterVersion.state, Adapter.name)
        .add_columns(Tenant.name)
        .join(Adapter, AdapterVersion.adapter_id == Adapter.id)
        .join(Tenant, Adapter.tenant_id == Tenant.id)
        .where(cast(AdapterVersion.card, String).contains(address))
        .order_by(Adapter.name, AdapterVersion.version)
    )
    found = []
    for card, derived_version, state, adapter, tenant in rows:
        training = card.get("training") if isinstance(card, dict) else None
        if not isinstance(training, dict):
            continue
        if address in str(training.get("stack_of", "")).split():
            how = "stack"
        elif training.get("truncated_from") == address:
            how = "truncation"
        else:
            continue
        found.append(DerivedVersion(adapter, tenant, derived_version, state, how))
    return found


def card_datasets(card: Any) -> list[str]:
    """The sha256 of every dataset a card lists, once each, in the card's order."""
    digests = [_digest_of(dataset) for dataset in _datasets(card)]
    return list(dict.fromkeys(d for d in digests if d is not None))


def _datasets(card: Any) -> list[dict[str, Any]]:
    datasets = card.get("datasets") if isinstance(card, dict) else None
    return [d for d in datasets if isinstance(d, dict)] if isinstance(datasets, list) else []


def _digest_of(dataset: dict[str, Any]) -> str | None:
    match = SHA256.fullmatch(str(dataset.get("sha256", "")).strip().lower())
    return match[1] if match else None
