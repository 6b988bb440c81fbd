"""Schema migrations on SQLite and PostgreSQL: rows written at an older revision (with that
revision's columns, not today's models) survive upgrading to head and work with the new code;
downgrading and upgrading again round-trips."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.operations import Operations
from sqlalchemy import Connection, MetaData, inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

from registry import service
from registry.compat import BaseModelFingerprint
from registry.db import alembic_config, make_session_factory, migrate
from registry.ngram_filter import FilterHeader, NgramFilter, ngram_hashes
from registry.store.local import LocalArtifactStore

HEAD = "0006"
SHADOW_COLUMNS = {"shadow_version", "shadow_percent"}
ROLLOUT_COLUMNS = {
    "canary_percent",
    "rollout_paused",
    "active_target",
    "rollout_thresholds",
    "rolled_back_version",
    "rolled_back_at",
    "rollout_updated_at",
}


async def schema(engine: AsyncEngine) -> tuple[str, set[str], set[str]]:
    """(revision, table names, adapters' column names)."""

    def read(connection: Connection) -> tuple[str, set[str], set[str]]:
        revision = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
        inspector = inspect(connection)
        columns = {c["name"] for c in inspector.get_columns("adapters")}
        return str(revision), set(inspector.get_table_names()), columns

    async with engine.connect() as connection:
        return await connection.run_sync(read)


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    def run(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.downgrade(config, revision)

    async with engine.begin() as connection:
        await connection.run_sync(run)


async def write_old_rows(engine: AsyncEngine, base_fp: BaseModelFingerprint) -> None:
    """An adapter with one version, written through the tables as they are now (reflected),
    the way code of that revision would have: today's models know columns they lack."""
    now = datetime.now(UTC)

    def write(connection: Connection) -> None:
        tables = MetaData()
        tables.reflect(connection)

        def insert(table: str, /, **row: Any) -> int:
            result = connection.execute(tables.tables[table].insert().values(**row))
            assert result.inserted_primary_key is not None
            return int(result.inserted_primary_key[0])

        base = insert(
            "base_models",
            name="tiny",
            weights_sha256=base_fp.weights_sha256,
            tokenizer_sha256=base_fp.tokenizer_sha256,
            model_type=base_fp.model_type,
            hidden_size=base_fp.hidden_size,
            intermediate_size=base_fp.intermediate_size,
            num_layers=base_fp.num_layers,
            num_heads=base_fp.num_heads,
            num_kv_heads=base_fp.num_kv_heads,
            head_dim=base_fp.head_dim,
            vocab_size=base_fp.vocab_size,
            modules={m: [d.in_features, d.out_features] for m, d in base_fp.modules.items()},
            special_tokens=sorted(base_fp.special_tokens),
            weight_files=list(base_fp.weight_files),
            created_at=now,
        )
        acme = insert("tenants", name="acme", limits=None, created_at=now)
        insert("tenants", name="globex", limits=None, created_at=now)
        adapter = insert(
            "adapters",
            name="acme-private",
            tenant_id=acme,
            base_model_id=base,
            visibility="private",
            created_at=now,
            stable_version=1,
        )
        insert(
            "adapter_versions",
            adapter_id=adapter,
            version=1,
            artifact_sha256="ab" * 32,
            rank=8,
            alpha=16.0,
            use_rslora=False,
            target_modules=["q_proj"],
            dtype="F32",
            size_bytes=1,
            peft_config={},
            card=None,
            state="production",
            created_by="root",
            created_at=now,
            state_changed_at=now,
        )

    async with engine.begin() as connection:
        await connection.run_sync(write)


async def test_a_0001_database_upgrades_with_its_rows(
    blank_engine: AsyncEngine,
    store: LocalArtifactStore,
    base_fp: BaseModelFingerprint,
    make_adapter: Callable[..., Path],
):
    await migrate(blank_engine, revision="0001")
    revision, tables, columns = await schema(blank_engine)
    assert revision == "0001" and not {"api_keys", "adapter_shares", "rollout_events"} & tables
    assert not (ROLLOUT_COLUMNS | SHADOW_COLUMNS) & columns
    await write_old_rows(blank_engine, base_fp)

    await migrate(blank_engine)
    revision, tables, columns = await schema(blank_engine)
    assert revision == HEAD and {"api_keys", "adapter_shares", "rollout_events"} <= tables
    assert columns >= ROLLOUT_COLUMNS | SHADOW_COLUMNS

    sessions = make_session_factory(blank_engine)
    async with sessions() as session:
        assert [t.name for t in await service.list_tenants(session)] == ["acme", "globex"]
        assert (await service.get_version(session, name="acme-private", version=1)).rank == 8
        issued = await service.create_api_key(session, tenant="globex", actor="root")
        await service.share_adapter(session, name="acme-private", tenant="globex", actor="root")
        caller = await service.authenticate_api_key(session, presented=issued.plaintext)
        visible = await service.list_resolvable(session, store=store, tenant=caller.tenant)
        assert [(r.name, r.version) for r in visible] == [("acme-private", 1)]

        # An old adapter starts with no rollout state and rolls out like a new one.
        view = await service.rollout_status(session, name="acme-private")
        assert (view.stable_version, view.canary_version, view.paused) == (1, None, False)
        assert view.updated_at is None and await service.list_rollouts(session) == []
        await evaluated_second_version(session, store, make_adapter, base_fp)
        view = await service.start_rollout(session, name="acme-private", version=2, actor="root")
        assert (view.stable_version, view.canary_version, view.canary_percent) == (1, 2, 1)
        assert await service.rollout_generation(session) == view.updated_at

    await migrate(blank_engine)  # idempotent at head


async def evaluated_second_version(session, store, make_adapter, base_fp) -> None:
    """acme-private@2, evaluated: ready for a canary or a shadow."""
    await service.register_adapter_version(
        session,
        store=store,
        artifact_dir=make_adapter("qv-r4", r=4, lora_alpha=8, target_modules=["q_proj"]),
        name="acme-private",
        tenant="acme",
        served_base=base_fp,
        max_lora_rank=16,
        actor="root",
    )
    await service.mark_evaluated(session, name="acme-private", version=2, actor="root")


async def test_a_0002_database_upgrades_to_rollouts(
    blank_engine: AsyncEngine, base_fp: BaseModelFingerprint
):
    await migrate(blank_engine, revision="0002")
    await write_old_rows(blank_engine, base_fp)
    await migrate(blank_engine)  # today's models need every later column too
    sessions = make_session_factory(blank_engine)
    async with sessions() as session:
        view = await service.set_thresholds(
            session, name="acme-private", thresholds={"window": 200}, actor="root"
        )
        assert view.threshold_override == {"window": 200} and view.rollback_target == "base"
        assert [v.name for v in await service.list_rollouts(session)] == ["acme-private"]


async def test_a_0003_database_upgrades_to_shadows(
    blank_engine: AsyncEngine,
    store: LocalArtifactStore,
    base_fp: BaseModelFingerprint,
    make_adapter: Callable[..., Path],
):
    await migrate(blank_engine, revision="0003")
    await write_old_rows(blank_engine, base_fp)
    assert not SHADOW_COLUMNS & (await schema(blank_engine))[2]
    await migrate(blank_engine)
    assert (await schema(blank_engine))[2] >= SHADOW_COLUMNS
    sessions = make_session_factory(blank_engine)
    async with sessions() as session:
        view = await service.rollout_status(session, name="acme-private")
        assert (view.shadow_version, view.shadow_percent) == (None, 0)
        await evaluated_second_version(session, store, make_adapter, base_fp)
        view = await service.start_shadow(
            session, name="acme-private", version=2, percent=10, actor="root"
        )
        assert (view.stable_version, view.shadow_version, view.shadow_percent) == (1, 2, 10)

    await downgrade(blank_engine, "0003")  # the shadow pointer goes, the adapter stays
    revision, _, columns = await schema(blank_engine)
    assert revision == "0003" and not SHADOW_COLUMNS & columns and columns >= ROLLOUT_COLUMNS


async def test_a_0004_database_upgrades_to_feedback_verdicts(
    blank_engine: AsyncEngine, base_fp: BaseModelFingerprint
):
    await migrate(blank_engine, revision="0004")
    await write_old_rows(blank_engine, base_fp)
    assert "feedback_verdicts" not in (await schema(blank_engine))[1]
    await migrate(blank_engine)
    revision, tables, _ = await schema(blank_engine)
    assert revision == HEAD and "feedback_verdicts" in tables
    sessions = make_session_factory(blank_engine)
    async with sessions() as session:
        first = await service.record_verdict(
            session,
            response_sha256="ab" * 32,
            outcome="success",
            at=datetime.now(UTC),
            token="call-1",
        )
        assert first is None
        assert (await service.rollout_status(session, name="acme-private")).stable_version == 1

    await downgrade(blank_engine, "0004")  # the verdicts go, the adapters stay
    revision, tables, columns = await schema(blank_engine)
    assert revision == "0004" and "feedback_verdicts" not in tables and columns >= SHADOW_COLUMNS


async def test_a_0005_database_upgrades_to_dataset_ngram_filters(
    blank_engine: AsyncEngine, base_fp: BaseModelFingerprint
):
    await migrate(blank_engine, revision="0005")
    await write_old_rows(blank_engine, base_fp)
    assert "dataset_ngram_filters" not in (await schema(blank_engine))[1]
    await migrate(blank_engine)
    revision, tables, _ = await schema(blank_engine)
    assert revision == HEAD and "dataset_ngram_filters" in tables
    ngram_filter = NgramFilter.sized_for(10)
    ngram_filter.add(ngram_hashes("one two three four five six seven eight nine"))
    header = FilterHeader(
        dataset_sha256="ab" * 32,
        ngram_words=8,
        hash_count=ngram_filter.hash_count,
        bit_count=ngram_filter.bit_count,
        ngrams=2,
        texts=1,
        lines=1,
        dataset_bytes=50,
    )
    sessions = make_session_factory(blank_engine)
    async with sessions() as session:
        await service.register_ngram_filter(
            session,
            header=header,
            ngram_filter=ngram_filter,
            false_positive_rate=ngram_filter.false_positive_rate(),
            actor="root",
        )
        loaded = await service.load_ngram_filters(session, dataset_sha256s=["ab" * 32])
        assert bytes(loaded["ab" * 32][1].bits) == bytes(ngram_filter.bits)
        assert (await service.rollout_status(session, name="acme-private")).stable_version == 1

    await downgrade(blank_engine, "0005")  # the filters go, the adapters stay
    revision, tables, columns = await schema(blank_engine)
    assert revision == "0005" and "dataset_ngram_filters" not in tables
    assert "feedback_verdicts" in tables and columns >= SHADOW_COLUMNS


async def test_downgrade_and_upgrade_again(
    blank_engine: AsyncEngine, base_fp: BaseModelFingerprint
):
    await migrate(blank_engine)
    await write_old_rows(blank_engine, base_fp)
    sessions = make_session_factory(blank_engine)
    async with sessions() as session:
        await service.set_thresholds(
            session, name="acme-private", thresholds={"window": 200}, actor="root"
        )
        await service.rollback(
            session, name="acme-private", actor="monitor", reason="latency_p95", automatic=True
        )
        assert len(await service.list_rollout_events(session, name="acme-private")) == 1

    await downgrade(blank_engine, "0002")
    revision, tables, columns = await schema(blank_engine)
    assert revision == "0002" and "rollout_events" not in tables and "api_keys" in tables
    assert not ROLLOUT_COLUMNS & columns and "stable_version" in columns
    await downgrade(blank_engine, "0001")
    revision, tables, _ = await schema(blank_engine)
    assert revision == "0001" and not {"api_keys", "adapter_shares"} & tables
    assert {"tenants", "adapters", "audit_log"} <= tables

    await migrate(blank_engine)
    assert (await schema(blank_engine))[0] == HEAD
    async with sessions() as session:  # the adapter survived; its rollout state did not
        view = await service.rollout_status(session, name="acme-private")
        assert (view.stable_version, view.active_target, view.threshold_override) == (1, None, None)


async def test_an_upgrade_interrupted_mid_revision_leaves_the_old_schema_and_runs_again(
    blank_engine: AsyncEngine, base_fp: BaseModelFingerprint, monkeypatch
):
    """A gateway killed inside revision 0003 (after its ADD COLUMNs, before rollout_events):
    Python's sqlite3 had committed each ADD COLUMN on its own while alembic_version stayed at
    0002, and every later start failed on "duplicate column name" (review)."""
    await migrate(blank_engine, revision="0002")
    await write_old_rows(blank_engine, base_fp)
    create_table = Operations.create_table

    def crash(self: Operations, name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "rollout_events":
            raise RuntimeError("killed mid-migration")
        return create_table(self, name, *args, **kwargs)

    monkeypatch.setattr(Operations, "create_table", crash)
    with pytest.raises(RuntimeError, match="killed mid-migration"):
        await migrate(blank_engine)
    revision, tables, columns = await schema(blank_engine)
    assert revision == "0002" and "rollout_events" not in tables
    assert not ROLLOUT_COLUMNS & columns  # all of the revision or none of it

    monkeypatch.setattr(Operations, "create_table", create_table)
    await migrate(blank_engine)  # the next start
    revision, tables, columns = await schema(blank_engine)
    assert revision == HEAD and "rollout_events" in tables and columns >= ROLLOUT_COLUMNS
    sessions = make_session_factory(blank_engine)
    async with sessions() as session:
        view = await service.rollout_status(session, name="acme-private")
        assert (view.stable_version, view.active_target) == (1, None)
