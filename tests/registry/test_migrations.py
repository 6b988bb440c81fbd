"""Schema migrations on SQLite and PostgreSQL: a database written at 0001 upgrades to head with
its rows intact and works with the new tables; downgrading and upgrading again round-trips."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from sqlalchemy import Connection, inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

from registry import service
from registry.compat import BaseModelFingerprint
from registry.db import alembic_config, make_session_factory, migrate
from registry.store.local import LocalArtifactStore


async def schema(engine: AsyncEngine) -> tuple[str, set[str]]:
    def read(connection: Connection) -> tuple[str, set[str]]:
        revision = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
        return str(revision), set(inspect(connection).get_table_names())

    async with engine.connect() as connection:
        return await connection.run_sync(read)


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    def run(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.downgrade(config, revision)

    async with engine.begin() as connection:
        await connection.run_sync(run)


async def test_a_0001_database_upgrades_with_its_rows(
    blank_engine: AsyncEngine,
    store: LocalArtifactStore,
    base_fp: BaseModelFingerprint,
    good_adapter: Path,
):
    await migrate(blank_engine, revision="0001")
    revision, tables = await schema(blank_engine)
    assert revision == "0001" and not {"api_keys", "adapter_shares"} & tables
    sessions = make_session_factory(blank_engine)
    async with sessions() as session:  # written by the 0001-era code paths
        await service.register_base_model(session, name="tiny", fingerprint=base_fp, actor="s")
        await service.create_tenant(session, name="acme", actor="root")
        await service.create_tenant(session, name="globex", actor="root")
        await service.register_adapter_version(
            session,
            store=store,
            artifact_dir=good_adapter,
            name="acme-private",
            tenant="acme",
            served_base=base_fp,
            max_lora_rank=16,
            actor="root",
        )

    await migrate(blank_engine)
    revision, tables = await schema(blank_engine)
    assert revision == "0002" and {"api_keys", "adapter_shares"} <= tables

    async with sessions() as session:
        assert [t.name for t in await service.list_tenants(session)] == ["acme", "globex"]
        assert (await service.get_version(session, name="acme-private", version=1)).rank == 8
        issued = await service.create_api_key(session, tenant="globex", actor="root")
        await service.share_adapter(session, name="acme-private", tenant="globex", actor="root")
        caller = await service.authenticate_api_key(session, presented=issued.plaintext)
        visible = await service.list_resolvable(session, store=store, tenant=caller.tenant)
        assert [r.name for r in visible] == ["acme-private"]

    await migrate(blank_engine)  # idempotent at head


async def test_downgrade_and_upgrade_again(blank_engine: AsyncEngine):
    await migrate(blank_engine)
    await downgrade(blank_engine, "0001")
    revision, tables = await schema(blank_engine)
    assert revision == "0001" and not {"api_keys", "adapter_shares"} & tables
    assert {"tenants", "adapters", "audit_log"} <= tables
    await migrate(blank_engine)
    assert (await schema(blank_engine))[0] == "0002"
