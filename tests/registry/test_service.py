"""The service layer end to end, on SQLite and on PostgreSQL: register, resolve, retire, delete,
audit, and every refusal path, with real peft adapters and a real local artifact store."""

from __future__ import annotations

import io
import shutil
import tarfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from registry import service
from registry.compat import BaseModelFingerprint, ProblemCode, fingerprint_base_model
from registry.db import migrate
from registry.errors import (
    AdapterNotFound,
    AdapterRejected,
    BaseModelMismatch,
    BaseModelNotFound,
    DuplicateAdapter,
    DuplicateTenant,
    InvalidName,
    InvalidStateTransition,
    TenantNotFound,
)
from registry.ingest import ingest_upload
from registry.models import Adapter, AdapterVersion, Base
from registry.states import VersionState, Visibility
from registry.store.local import LocalArtifactStore
from tests.registry.helpers import flip_bit

BASE = "tiny-llama"
C = ProblemCode


@dataclass
class World:
    session: AsyncSession
    store: LocalArtifactStore
    base_fp: BaseModelFingerprint

    async def register(self, folder: Path, name: str, **kw: Any) -> AdapterVersion:
        args: dict[str, Any] = {
            "tenant": "acme",
            "served_base": self.base_fp,
            "max_lora_rank": 16,
            "actor": "admin@acme",
            **kw,
        }
        return await service.register_adapter_version(
            self.session, store=self.store, artifact_dir=folder, name=name, **args
        )


@pytest.fixture
async def world(session: AsyncSession, store: LocalArtifactStore, base_fp) -> World:
    await service.register_base_model(session, name=BASE, fingerprint=base_fp, actor="system")
    await service.create_tenant(session, name="acme", actor="root")
    await service.create_tenant(session, name="globex", actor="root")
    return World(session, store, base_fp)


def card(**overrides: Any) -> dict[str, Any]:
    return {
        "owner": "ml-platform@acme",
        "objective": "sft",
        "rollback_path": "base",
        "sla": {"p95_ttft_ms": 85},
        "rollback": {"margin_ms": 15, "error_rate": 0.001, "window_requests": 100},
        "datasets": [{"name": "tickets-2024", "sha256": "sha256:" + "ab" * 32, "rows": 42500}],
        "evals": [{"name": "held-out", "metric": "accuracy", "value": 0.984, "baseline": 0.858}],
        **overrides,
    }


async def count(session: AsyncSession, model: type[Base]) -> int:
    return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def test_migrations_match_the_models(engine: AsyncEngine):
    def diff(connection: Any) -> list[Any]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)

    async with engine.connect() as connection:
        assert await connection.run_sync(diff) == []


async def test_migrate_is_idempotent(engine: AsyncEngine):
    await migrate(engine)  # every gateway start runs it


async def test_register_resolve_and_audit(world: World, good_adapter: Path):
    version = await world.register(
        good_adapter, "acme-support", card=card(), base_sha256=world.base_fp.weights_sha256
    )
    assert (version.version, version.state, version.rank, version.alpha) == (
        1,
        VersionState.COMPATIBLE,
        8,
        16.0,
    )
    assert (version.dtype, version.use_rslora, version.scale) == ("F32", False, 2.0)
    assert version.target_modules == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert version.card is not None and version.card["datasets"][0]["sha256"] == "ab" * 32
    stored = await world.store.get_path(version.artifact_sha256)
    assert sorted(p.name for p in stored.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]

    resolved = await service.resolve_adapter(
        world.session, store=world.store, model="acme-support", tenant="acme"
    )
    assert (resolved.address, resolved.path, resolved.scale) == ("acme-support@1", stored, 2.0)
    assert resolved.version_id == version.id and resolved.created_at == version.created_at
    assert resolved.base_sha256 == world.base_fp.weights_sha256

    actions = [e.action for e in await service.list_audit(world.session)]
    assert actions == [
        "adapter_version.register",
        "adapter.create",
        "tenant.create",
        "tenant.create",
        "base_model.register",
    ]
    entry = (await service.list_audit(world.session, target="adapter:acme-support"))[0]
    assert entry.actor == "admin@acme" and entry.details["version"] == 1
    assert entry.at.tzinfo is not None


async def test_versions_increment_and_a_new_version_does_not_take_the_name(
    world: World, good_adapter: Path, make_adapter: Callable[..., Path]
):
    await world.register(good_adapter, "acme-support")
    second = await world.register(
        make_adapter("qv-r4", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "acme-support",
    )
    assert second.version == 2
    named = await service.resolve_adapter(world.session, store=world.store, model="acme-support")
    pinned = await service.resolve_adapter(world.session, store=world.store, model="acme-support@2")
    assert (named.version, named.rank, pinned.version, pinned.rank) == (1, 8, 2, 4)
    versions = await service.list_versions(world.session, name="acme-support")
    assert [v.version for v in versions] == [1, 2]
    # Retiring the stable hands the name to its successor (here the only other version).
    await service.retire_version(world.session, name="acme-support", version=1, actor="a")
    named = await service.resolve_adapter(world.session, store=world.store, model="acme-support")
    assert named.version == 2


async def test_identical_files_are_not_a_new_version(world: World, good_adapter: Path):
    await world.register(good_adapter, "acme-support")
    with pytest.raises(AdapterRejected) as refused:
        await world.register(good_adapter, "acme-support")
    assert [p.code for p in refused.value.problems] == [C.DUPLICATE_ARTIFACT]


async def test_a_refusal_stores_nothing_but_is_audited(
    world: World, make_adapter: Callable[..., Path]
):
    folder = make_adapter("dora", use_dora=True, target_modules=["q_proj", "v_proj"])
    with pytest.raises(AdapterRejected) as refused:
        await world.register(folder, "acme-dora", card=card())
    assert C.DORA in {p.code for p in refused.value.problems}
    assert not (world.store.root / "trees").exists()
    assert await count(world.session, Adapter) == 0
    assert await count(world.session, AdapterVersion) == 0
    entry = (await service.list_audit(world.session, action="adapter_version.reject"))[0]
    assert entry.target == "adapter:acme-dora"
    assert "dora_unsupported" in {p["code"] for p in entry.details["problems"]}


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "x..y", "Upper", "", "a" * 64, "a@1"])
async def test_bad_names_are_refused_with_the_other_reasons(
    world: World, good_adapter: Path, name: str
):
    with pytest.raises(AdapterRejected) as refused:
        await world.register(good_adapter, name, max_lora_rank=4)
    assert {p.code for p in refused.value.problems} == {C.INVALID_NAME, C.RANK_EXCEEDS_LIMIT}
    assert not (world.store.root / "trees").exists()


async def test_names_belong_to_one_tenant(world: World, good_adapter, make_adapter):
    await world.register(good_adapter, "support")
    other = make_adapter("qv-r4", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    with pytest.raises(DuplicateAdapter):
        await world.register(other, "support", tenant="globex")


async def test_tenant_scoping(world: World, good_adapter, make_adapter):
    await world.register(good_adapter, "acme-private")
    guard = make_adapter("qv-r4", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    await world.register(guard, "safety-guard", tenant="globex", visibility=Visibility.SHARED)
    resolve = service.resolve_adapter
    with pytest.raises(AdapterNotFound) as hidden:
        await resolve(world.session, store=world.store, model="acme-private", tenant="globex")
    with pytest.raises(AdapterNotFound) as missing:
        await resolve(world.session, store=world.store, model="no-such", tenant="globex")
    assert str(hidden.value).replace("acme-private", "X") == str(missing.value).replace(
        "no-such", "X"
    )
    shared = await resolve(world.session, store=world.store, model="safety-guard", tenant="acme")
    assert shared.tenant == "globex"
    for tenant, names in (("acme", ["acme-private", "safety-guard"]), ("globex", ["safety-guard"])):
        listed = await service.list_resolvable(world.session, store=world.store, tenant=tenant)
        assert [r.name for r in listed] == names
    other_base = await service.list_resolvable(
        world.session, store=world.store, base_sha256="0" * 64
    )
    assert other_base == []


async def test_a_flipped_bit_in_the_served_base_is_refused_everywhere(
    world: World, good_adapter: Path, tiny_base: Path, tmp_path: Path, make_adapter
):
    await world.register(good_adapter, "acme-support")
    flipped_dir = tmp_path / "flipped"
    shutil.copytree(tiny_base, flipped_dir)
    flip_bit(flipped_dir / "model.safetensors", offset_from_end=4096, bit=6)
    flipped = fingerprint_base_model(flipped_dir)
    # Start-up: the same name with other bytes → refuse to start.
    with pytest.raises(BaseModelMismatch) as mismatch:
        await service.register_base_model(
            world.session, name=BASE, fingerprint=flipped, actor="system"
        )
    assert mismatch.value.problems[0].code == C.BASE_MISMATCH
    with pytest.raises(BaseModelNotFound):
        await service.get_served_base(world.session, fingerprint=flipped)
    # Even registered under another name, adapters bound to the genuine base are refused on it.
    await service.register_base_model(
        world.session, name="tiny-llama-flipped", fingerprint=flipped, actor="system"
    )
    next_version = make_adapter("qv-r4", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    with pytest.raises(AdapterRejected) as refused:
        await world.register(next_version, "acme-support", served_base=flipped)
    assert [p.code for p in refused.value.problems] == [C.BASE_MISMATCH]
    with pytest.raises(AdapterRejected):
        await world.register(
            next_version,
            "new-one",
            served_base=flipped,
            card=card(base_sha256=world.base_fp.weights_sha256),
        )


async def test_retire_then_delete_removes_the_artifact_and_keeps_numbers(
    world: World, good_adapter: Path, make_adapter
):
    v1 = await world.register(good_adapter, "acme-support")
    retired = await service.retire_version(
        world.session, name="acme-support", version=1, actor="admin", reason="superseded"
    )
    assert retired.state == VersionState.RETIRED
    with pytest.raises(AdapterNotFound):
        await service.resolve_adapter(world.session, store=world.store, model="acme-support")
    with pytest.raises(InvalidStateTransition):
        await service.retire_version(world.session, name="acme-support", version=1, actor="a")
    deleted = await service.delete_version(
        world.session, store=world.store, name="acme-support", version=1, actor="admin"
    )
    assert deleted.state == VersionState.DELETED
    assert not await world.store.exists(v1.artifact_sha256)
    with pytest.raises(InvalidStateTransition):
        await service.delete_version(
            world.session, store=world.store, name="acme-support", version=1, actor="admin"
        )
    again = await world.register(good_adapter, "acme-support")  # same files, new number
    assert again.version == 2 and await world.store.exists(again.artifact_sha256)
    actions = [
        e.action for e in await service.list_audit(world.session, target="adapter:acme-support")
    ]
    assert actions[:4] == [
        "adapter_version.register",
        "adapter_version.delete",
        "adapter_version.retire",
        "adapter_version.register",
    ]
    delete_entry = (await service.list_audit(world.session, action="adapter_version.delete"))[0]
    assert delete_entry.details["artifact_removed"] is True


async def test_delete_keeps_an_artifact_another_version_uses(world: World, good_adapter: Path):
    first = await world.register(good_adapter, "acme-a")
    second = await world.register(good_adapter, "acme-b")
    assert first.artifact_sha256 == second.artifact_sha256  # content-addressed, stored once
    await service.delete_version(
        world.session, store=world.store, name="acme-a", version=1, actor="x"
    )
    assert await world.store.exists(first.artifact_sha256)
    await service.delete_version(
        world.session, store=world.store, name="acme-b", version=1, actor="x"
    )
    assert not await world.store.exists(first.artifact_sha256)


async def test_live_versions_cannot_be_deleted(world: World, good_adapter: Path):
    version = await world.register(good_adapter, "acme-support")
    version.state = VersionState.PRODUCTION  # what the rollout issue will do
    await world.session.commit()
    with pytest.raises(InvalidStateTransition):
        await service.delete_version(
            world.session, store=world.store, name="acme-support", version=1, actor="x"
        )
    await service.retire_version(world.session, name="acme-support", version=1, actor="x")


async def test_versions_are_immutable(world: World, good_adapter: Path):
    version = await world.register(good_adapter, "acme-support")
    version.rank = 4
    with pytest.raises(ValueError, match="immutable"):
        await world.session.commit()
    await world.session.rollback()


async def test_invalid_card_lists_every_reason(world: World, good_adapter: Path):
    bad = card(surprise=1, datasets=[{"name": "x", "sha256": "not-a-hash"}])
    with pytest.raises(AdapterRejected) as refused:
        await world.register(good_adapter, "acme-support", card=bad)
    messages = [p.message for p in refused.value.problems if p.code == C.CARD_INVALID]
    assert len(messages) == 2
    assert any("surprise" in m for m in messages) and any(
        "datasets.0.sha256" in m for m in messages
    )


async def test_rollback_paths(world: World, good_adapter: Path, make_adapter):
    small = make_adapter("qv-r4", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    rs = make_adapter("rslora", r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj"])

    async def problems(folder: Path, name: str, path: str, **kw: Any) -> list[ProblemCode]:
        try:
            await world.register(folder, name, card=card(rollback_path=path), **kw)
        except AdapterRejected as exc:
            return [p.code for p in exc.problems]
        return []

    assert await problems(good_adapter, "alpha", "nonexistent") == [C.ROLLBACK_PATH_INVALID]
    assert await problems(good_adapter, "alpha", "alpha") == [C.ROLLBACK_PATH_INVALID]
    assert await problems(good_adapter, "alpha", "base") == []
    assert await problems(small, "alpha", "alpha@1") == []  # back to one's own earlier version
    assert await problems(rs, "beta", "alpha") == []  # beta → alpha → alpha@1 → base
    # alpha v3 pointing at beta would close a loop: beta follows alpha's newest version.
    assert await problems(make_adapter("r2", r=2, lora_alpha=4), "alpha", "beta") == [
        C.ROLLBACK_PATH_INVALID
    ]
    assert await problems(rs, "gamma", "alpha", tenant="globex") == [C.ROLLBACK_PATH_INVALID]


async def test_visibility_is_fixed_per_adapter(world: World, good_adapter, make_adapter):
    await world.register(good_adapter, "acme-support")
    small = make_adapter("qv-r4", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    with pytest.raises(AdapterRejected) as refused:
        await world.register(small, "acme-support", visibility=Visibility.SHARED)
    assert [p.code for p in refused.value.problems] == [C.VISIBILITY_MISMATCH]


async def test_tenants_and_bases(world: World, base_fp):
    with pytest.raises(DuplicateTenant):
        await service.create_tenant(world.session, name="acme", actor="root")
    with pytest.raises(TenantNotFound):
        await service.get_tenant(world.session, name="initech")
    with pytest.raises(InvalidName):
        await service.create_tenant(world.session, name="../root", actor="root")
    again = await service.register_base_model(
        world.session, name=BASE, fingerprint=base_fp, actor="system"
    )  # idempotent on every start
    assert again.weights_sha256 == base_fp.weights_sha256
    assert again.modules["k_proj"] == [64, 32]
    assert (await service.get_served_base(world.session, fingerprint=base_fp)).name == BASE
    assert len(await service.list_audit(world.session, action="base_model.register")) == 1


async def test_unknown_tenant_or_unregistered_base(world: World, good_adapter, tmp_path, tiny_base):
    with pytest.raises(TenantNotFound):
        await world.register(good_adapter, "x", tenant="initech")
    other = tmp_path / "other"
    shutil.copytree(tiny_base, other)
    flip_bit(other / "model.safetensors")
    with pytest.raises(BaseModelNotFound):
        await world.register(good_adapter, "x", served_base=fingerprint_base_model(other))


async def test_register_from_an_uploaded_tar(world: World, good_adapter: Path, tmp_path: Path):
    """The gateway's path: UploadFile chunks → ingest_upload → register."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(good_adapter, arcname="my-adapter")
    payload = buffer.getvalue()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 4096):
            yield payload[start : start + 4096]

    folder = await ingest_upload(chunks(), workdir=tmp_path / "upload", max_bytes=10 * 2**20)
    assert folder.name == "my-adapter"
    version = await world.register(folder, "uploaded")
    assert version.version == 1 and version.rank == 8


async def test_an_adapter_cannot_take_a_base_models_name(world: World, good_adapter: Path):
    # `model: tiny-llama` reaches the base: an adapter of that name could never be served.
    with pytest.raises(AdapterRejected) as refused:
        await world.register(good_adapter, BASE)
    (problem,) = refused.value.problems
    assert problem.code == C.INVALID_NAME and "names the base model 'tiny-llama'" in problem.message


async def test_a_new_base_cannot_take_an_adapters_name(
    world: World, good_adapter: Path, tmp_path: Path, tiny_base: Path
):
    await world.register(good_adapter, "support-bot")
    other = tmp_path / "other"
    shutil.copytree(tiny_base, other)
    flip_bit(other / "model.safetensors")
    # Its callers would silently get the base model's answers instead of their adapter's.
    with pytest.raises(InvalidName, match="taken by adapter 'support-bot'"):
        await service.register_base_model(
            world.session,
            name="support-bot",
            fingerprint=fingerprint_base_model(other),
            actor="system",
        )


async def test_the_uploads_base_claim_and_its_cards_must_agree(world: World, good_adapter: Path):
    served = world.base_fp.weights_sha256
    other = "0" * 64
    with pytest.raises(AdapterRejected) as refused:
        await world.register(
            good_adapter, "claims", base_sha256=served, card=card(base_sha256=f"sha256:{other}")
        )
    assert [p.code for p in refused.value.problems] == [C.BASE_MISMATCH]
    assert "its card claims" in refused.value.problems[0].message
    agreed = await world.register(
        good_adapter,
        "claims",
        base_sha256=f"sha256:{served.upper()}",
        card=card(base_sha256=f"sha256:{served}"),
    )
    assert agreed.version == 1
