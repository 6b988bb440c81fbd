"""Registering adapter versions: the name, the card, the gate, then the store and the row.

Order matters: every check runs first and all their problems are collected; only a fully
accepted upload is copied into the store and recorded. A refusal stores no artifact and no
version, only an audit row saying who tried what and why it was refused.

The copy or upload runs outside any transaction, before the adapter's lock (on SQLite, the
database's write lock), which is held only to check again and write the row: it takes as long
as the adapter is big, and a canary's automatic rollback of the adapter waited for it (on
SQLite every write did, and failed "database is locked" after busy_timeout). The store is
content-addressed, so a version refused only then (a concurrent write the first checks could
not see) leaves a harmless orphan.

An adapter's first version serves its name at once. A later one does not: registering it pins
the version the name serves now as the stable (`pin_served_version`), and the new version
reaches the name through a canary, or callers who ask for `name@N`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from registry.card import AdaptationCard, card_json, parse_card
from registry.compat.artifact import ARTIFACT_FILES, AdapterArtifact, inspect_adapter
from registry.compat.checks import run_gate
from registry.compat.engine_limits import EngineLimits
from registry.compat.fingerprint import BaseModelFingerprint
from registry.compat.lora_keys import parse_lora_key
from registry.compat.problems import Problem, ProblemCode
from registry.errors import ArtifactError, DuplicateAdapter, RegistryConflict
from registry.models import Adapter, AdapterVersion, BaseModel, Tenant
from registry.naming import name_problem
from registry.service.audit import record
from registry.service.base_models import get_served_base
from registry.service.licenses import audience_problems
from registry.service.queries import (
    current_version,
    find_adapter,
    lock_artifact,
    next_version_number,
)
from registry.service.refusals import reject_registration
from registry.service.rollback_paths import rollback_path_problems
from registry.service.rollout_log import touch, touch_if_tracked
from registry.service.rollout_views import arms_fallback
from registry.service.tenants import get_tenant
from registry.states import VersionState, Visibility
from registry.store.base import ArtifactStore
from registry.store.digest import Entry, tree_digest


async def register_adapter_version(
    session: AsyncSession,
    *,
    store: ArtifactStore,
    artifact_dir: Path,
    name: str,
    tenant: str,
    served_base: BaseModelFingerprint,
    max_lora_rank: int,
    engine_dtype: str | None = None,
    actor: str,
    visibility: Visibility | None = None,
    card: Mapping[str, Any] | str | bytes | None = None,
    base_sha256: str | None = None,
) -> AdapterVersion:
    """Gate, store and record a new immutable version of adapter `name` (created on first use).

    `artifact_dir` is a local PEFT folder from `registry.ingest`; only adapter_config.json and
    adapter_model.safetensors are stored. `base_sha256` is the uploader's claim of the base it
    trained on (a card's `base_sha256` claims the same); an existing adapter stays bound to the
    base of its first version. New adapters default to private. `max_lora_rank` and
    `engine_dtype` describe the serving engine (EngineLimits); a dtype of None skips the value
    range check, which the gateway repeats before the first load once the engine runs.

    Raises AdapterRejected with every problem, TenantNotFound, BaseModelNotFound,
    DuplicateAdapter (name owned by another tenant) or RegistryConflict (lost a race)."""
    visibility = Visibility(visibility) if visibility is not None else None
    problems: list[Problem] = []
    if invalid := name_problem(name):
        problems.append(Problem(ProblemCode.INVALID_NAME, invalid))
    elif base_name := await _base_named(session, name):
        invalid = f"{name!r} names the base model {base_name!r}"
        problems.append(
            Problem(
                ProblemCode.INVALID_NAME,
                f"{invalid}: `model: {name}` reaches the base, never this adapter",
            )
        )
    parsed_card, card_problems = parse_card(card)
    problems += _contradicting_claims(parsed_card, base_sha256)
    # The slow part (reading and hashing every byte) before any lock: on SQLite the adapter's
    # lock is the whole database's write lock.
    artifact = await asyncio.to_thread(inspect_adapter, Path(artifact_dir))
    artifact = _with_claims(artifact, card=parsed_card, base_sha256=base_sha256)
    owner = await get_tenant(session, name=tenant)
    base = await get_served_base(session, fingerprint=served_base)
    limits = EngineLimits(max_lora_rank=max_lora_rank, dtype=engine_dtype)
    upload = _Upload(
        name=name,
        named=not invalid,
        owner=owner,
        base=base,
        visibility=visibility,
        card=parsed_card,
        early_problems=problems,
        card_problems=card_problems,
        gate_problems=run_gate(artifact, served_base, limits),
        expected=_expected_digest(artifact),
    )
    adapter = await find_adapter(session, name) if upload.named else None
    if refused := await _problems(session, adapter, upload):
        await reject_registration(session, actor=actor, name=name, tenant=tenant, problems=refused)

    expected = upload.expected
    assert expected is not None  # the gate refuses artifacts without both files
    # An upload takes minutes (up to 2 GiB to S3): a transaction left open meanwhile holds its
    # pooled connection idle in transaction (and on PostgreSQL a snapshot), so a few uploads
    # at once starved every request of connections. Only reads happened; committing (not
    # rolling back) ends it without expiring the rows read, or the caller's (as a refusal's
    # audit row does: reject_registration).
    await session.commit()
    digest = await _put(store, Path(artifact_dir), expected)
    # Decided again under the lock, on what committed since the first look: a concurrent
    # registration of the same files, or of the adapter's first version by another tenant.
    adapter = await find_adapter(session, name, for_update=True)
    if refused := await _problems(session, adapter, upload):
        await reject_registration(session, actor=actor, name=name, tenant=tenant, problems=refused)
    # Until this version's row commits, a delete of another version with the same files
    # must not remove the object; one that committed since put_dir may have removed it.
    await lock_artifact(session, expected)
    if not await store.exists(digest):
        await _put(store, Path(artifact_dir), expected)
    try:
        return await _insert_version(
            session,
            adapter=adapter,
            name=name,
            owner=owner,
            base=base,
            visibility=visibility or Visibility.PRIVATE,
            artifact=artifact,
            digest=digest,
            card=parsed_card,
            actor=actor,
        )
    except IntegrityError:
        await session.rollback()
        raise RegistryConflict(f"adapter {name!r} was changed concurrently; retry") from None


@dataclass(frozen=True)
class _Upload:
    """What a registration is judged on, apart from the adapter's row: checked before storing
    and again under the adapter's lock (`_problems`)."""

    name: str
    named: bool  # the name is valid: the adapter's row may exist
    owner: Tenant
    base: BaseModel
    visibility: Visibility | None
    card: AdaptationCard | None
    early_problems: list[Problem]  # the name's and the claims'
    card_problems: list[Problem]
    gate_problems: list[Problem]
    expected: str | None  # the digest the inspected files will be stored under


async def _problems(
    session: AsyncSession, adapter: Adapter | None, upload: _Upload
) -> list[Problem]:
    """Every reason to refuse `upload` given the adapter's row as read now. Raises
    DuplicateAdapter when another tenant owns the name."""
    name = upload.name
    if adapter is not None and adapter.tenant_id != upload.owner.id:
        raise DuplicateAdapter(f"adapter name {name!r} is already taken")
    problems = list(upload.early_problems)
    visibility = upload.visibility
    if adapter is not None and visibility is not None and adapter.visibility != visibility:
        problems.append(
            Problem(
                ProblemCode.VISIBILITY_MISMATCH,
                f"adapter {name!r} is {adapter.visibility.value}; a new version cannot change that",
            )
        )
    problems += upload.card_problems
    problems += await audience_problems(session, adapter, visibility, upload.card)
    problems += _binding_problems(adapter, upload.base)
    problems += upload.gate_problems
    if upload.card is not None and upload.named:
        problems += await rollback_path_problems(
            session,
            target=upload.card.rollback_path,
            name=name,
            tenant=upload.owner,
            base=upload.base,
        )
    if adapter is not None and upload.expected is not None:
        problems += await _duplicate_artifact(session, adapter, upload.expected)
    return problems


async def _put(store: ArtifactStore, artifact_dir: Path, expected: str) -> str:
    digest = await store.put_dir(artifact_dir, files=ARTIFACT_FILES)
    if digest != expected:
        # What was stored is not what was inspected. Left in the store rather than deleted: it
        # may already be another version's artifact, and an orphan is harmless.
        raise ArtifactError("the adapter files changed between inspection and storage; retry")
    return digest


async def _base_named(session: AsyncSession, name: str) -> str | None:
    """The registered base named `name`, unless an adapter of that name exists already (its
    new versions stay welcome). A client's `model` that names a base reaches the base, as the
    gateway matches it exactly: a new adapter of that name could never be served."""
    if await find_adapter(session, name) is not None:
        return None
    return await session.scalar(select(BaseModel.name).where(BaseModel.name == name).limit(1))


def _contradicting_claims(card: AdaptationCard | None, base_sha256: str | None) -> list[Problem]:
    """The upload's base claim and its card's must agree: one of them is wrong, and the stored
    card would go on naming a base the adapter was not judged against."""
    claims = {
        claim.lower().removeprefix("sha256:")
        for claim in (base_sha256, card.base_sha256 if card else None)
        if claim
    }
    if len(claims) < 2:
        return []
    assert base_sha256 is not None and card is not None and card.base_sha256 is not None
    return [
        Problem(
            ProblemCode.BASE_MISMATCH,
            f"the upload claims base {base_sha256[:23]}… but its card claims "
            f"{card.base_sha256[:23]}…",
        )
    ]


def _with_claims(
    artifact: AdapterArtifact, *, card: AdaptationCard | None, base_sha256: str | None
) -> AdapterArtifact:
    """Attach what the uploader says the adapter was trained on (explicit claim, else the
    card's); the gate compares those with the served base. No claim: judged on shapes alone."""
    claimed_base = base_sha256 or (card.base_sha256 if card else None)
    return replace(
        artifact,
        declared_base_sha256=claimed_base.removeprefix("sha256:") if claimed_base else None,
        declared_tokenizer_sha256=card.tokenizer_sha256 if card else None,
    )


def _binding_problems(adapter: Adapter | None, base: BaseModel) -> list[Problem]:
    """Every version of an adapter runs on the base its first version was registered for."""
    if adapter is None or adapter.base_model_id == base.id:
        return []
    return [
        Problem(
            ProblemCode.BASE_MISMATCH,
            f"adapter {adapter.name!r} is bound to base {adapter.base_model.name!r} "
            f"({adapter.base_model.weights_sha256[:16]}…) but the served base is {base.name!r} "
            f"({base.weights_sha256[:16]}…); register it under a new name for this base",
        )
    ]


def _expected_digest(artifact: AdapterArtifact) -> str | None:
    digests = artifact.file_digests
    if not all(name in digests for name in ARTIFACT_FILES):
        return None
    return tree_digest({n: Entry(digests[n].size, digests[n].sha256) for n in ARTIFACT_FILES})


async def _duplicate_artifact(
    session: AsyncSession, adapter: Adapter, digest: str
) -> list[Problem]:
    same = await session.scalar(
        select(AdapterVersion.version).where(
            AdapterVersion.adapter_id == adapter.id,
            AdapterVersion.artifact_sha256 == digest,
            AdapterVersion.state != VersionState.DELETED,
        )
    )
    if same is None:
        return []
    return [
        Problem(
            ProblemCode.DUPLICATE_ARTIFACT,
            f"these exact files are already version {same} of {adapter.name!r}; versions are "
            "immutable, so a new version must change something",
        )
    ]


async def _insert_version(
    session: AsyncSession,
    *,
    adapter: Adapter | None,
    name: str,
    owner: Tenant,
    base: BaseModel,
    visibility: Visibility,
    artifact: AdapterArtifact,
    digest: str,
    card: AdaptationCard | None,
    actor: str,
) -> AdapterVersion:
    pinned = None
    if adapter is None:
        adapter = Adapter(name=name, tenant=owner, base_model=base, visibility=visibility)
        session.add(adapter)
        await session.flush()
        record(
            session,
            actor=actor,
            action="adapter.create",
            target=f"adapter:{name}",
            details={"tenant": owner.name, "visibility": visibility.value, "base": base.name},
        )
    else:
        pinned = await pin_served_version(session, adapter)
    assert artifact.rank is not None and artifact.alpha is not None and artifact.dtype
    version = AdapterVersion(
        adapter=adapter,
        version=await next_version_number(session, adapter.id),
        artifact_sha256=digest,
        rank=artifact.rank,
        alpha=artifact.alpha,
        use_rslora=artifact.use_rslora,
        target_modules=sorted(_modules(artifact)),
        dtype=artifact.dtype,
        size_bytes=artifact.weights_bytes,
        peft_config=dict(artifact.config or {}),
        card=card_json(card) if card is not None else None,
        state=VersionState.COMPATIBLE,
        created_by=actor[:200],
    )
    session.add(version)
    if pinned is None:  # `name` serves this version now
        if version.card is not None and arms_fallback(adapter, version):
            touch(adapter)  # replicas start judging it
        else:
            touch_if_tracked(adapter)
    record(
        session,
        actor=actor,
        action="adapter_version.register",
        target=f"adapter:{name}",
        details={
            "version": version.version,
            "artifact_sha256": digest,
            "rank": version.rank,
            "alpha": version.alpha,
            "use_rslora": version.use_rslora,
            "stable_version": pinned,
        },
    )
    await session.commit()
    return version


async def pin_served_version(session: AsyncSession, adapter: Adapter) -> int | None:
    """Before a new version of the (locked) adapter is added: pin what `name` serves now as its
    stable, so the new version reaches the bare name only through a canary (seed §7: 1 → 10 →
    50 → 100 %), or as `name@N` when asked for explicitly. Without a pin, the newest servable
    version serves, and a new registration took all of the name's traffic at once. Returns the
    stable version, or None when `name` serves nothing (then the new version serves at once,
    like an adapter's first)."""
    served = await current_version(session, adapter)
    if served is None:
        return None
    adapter.stable_version = served.version
    return served.version


def _modules(artifact: AdapterArtifact) -> set[str]:
    return {key.module for t in artifact.tensors if (key := parse_lora_key(t.name)) is not None}
