"""Retiring and deleting versions. Both are state changes on the immutable version row, audited;
delete also removes the artifact once no live version references it any more."""

from __future__ import annotations

import logging

from sqlalchemy.ext.asyncio import AsyncSession

from registry.errors import InvalidStateTransition
from registry.models import AdapterVersion, utcnow
from registry.service.audit import record
from registry.service.queries import artifact_references, get_version
from registry.states import VersionState, check_transition
from registry.store.base import ArtifactStore

logger = logging.getLogger(__name__)


async def retire_version(
    session: AsyncSession, *, name: str, version: int, actor: str, reason: str | None = None
) -> AdapterVersion:
    """Stop serving a version for good (kept for audit and as a deletion candidate)."""
    row = await get_version(session, name=name, version=version, for_update=True)
    previous = row.state
    _move(row, VersionState.RETIRED)
    record(
        session,
        actor=actor,
        action="adapter_version.retire",
        target=f"adapter:{name}",
        details={"version": version, "from": previous.value, "reason": reason},
    )
    await session.commit()
    return row


async def delete_version(
    session: AsyncSession,
    *,
    store: ArtifactStore,
    name: str,
    version: int,
    actor: str,
    reason: str | None = None,
) -> AdapterVersion:
    """Tombstone a version and delete its artifact if nothing else uses it (seed §6: contract
    end). Live versions (shadow/canary/production, or the rollout's pointers) are refused."""
    row = await get_version(session, name=name, version=version, for_update=True)
    adapter = row.adapter
    if version in (adapter.stable_version, adapter.canary_version):
        raise InvalidStateTransition(
            f"{name}@{version} is the adapter's stable or canary version; roll out another first"
        )
    previous = row.state
    _move(row, VersionState.DELETED)
    others = await artifact_references(session, row.artifact_sha256, excluding_id=row.id)
    remove_artifact = others == 0
    record(
        session,
        actor=actor,
        action="adapter_version.delete",
        target=f"adapter:{name}",
        details={
            "version": version,
            "from": previous.value,
            "artifact_sha256": row.artifact_sha256,
            "artifact_removed": remove_artifact,
            "reason": reason,
        },
    )
    await session.commit()
    if remove_artifact:
        # After the commit: a crash in between leaves an orphaned object, never a version row
        # pointing at a missing artifact.
        await store.delete(row.artifact_sha256)
        logger.info("deleted artifact %s of %s@%s", row.artifact_sha256, name, version)
    return row


def _move(row: AdapterVersion, target: VersionState) -> None:
    check_transition(row.state, target, what=f"{row.adapter.name}@{row.version}")
    row.state = target
    row.state_changed_at = utcnow()
