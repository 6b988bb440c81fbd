"""A statement that gave up on another transaction's lock is contention, not an outage, on the
real backends (found by review): SQLite's "database is locked" after busy_timeout was counted
as an unreachable registry, so one busy writer turned the gateway's caches stale for everyone.
PostgreSQL's lock_timeout, statement_timeout, cancel and deadlock are contention too, while
asyncpg's command_timeout (the server did not answer at all) stays an outage."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from registry.db import is_contention, is_unreachable, make_engine
from tests.registry.conftest import _postgres_unavailable, postgres_url

TIMEOUT = "200ms"
TABLE = f"contention_{uuid.uuid4().hex[:12]}"  # in the shared test database's public schema


async def sqlite_busy_error(folder: Path) -> DBAPIError:
    """The error a write meets while another connection holds SQLite's write lock."""
    url = f"sqlite+aiosqlite:///{folder / 'busy.db'}"
    holder, writer = make_engine(url), make_engine(url)
    try:
        async with holder.begin() as connection:
            await connection.execute(text("CREATE TABLE t (v int)"))
        async with holder.connect() as holding, writer.connect() as writing:
            await holding.execute(text("INSERT INTO t VALUES (1)"))  # the write lock, held
            await writing.exec_driver_sql("PRAGMA busy_timeout=100")
            with pytest.raises(DBAPIError) as raised:
                await writing.execute(text("INSERT INTO t VALUES (2)"))
            await holding.rollback()
    finally:
        await holder.dispose()
        await writer.dispose()
    return raised.value


async def test_a_locked_sqlite_database_is_contention(tmp_path: Path):
    busy = await sqlite_busy_error(tmp_path)
    assert "database is locked" in str(busy)
    assert is_contention(busy)


@pytest.fixture
async def pg() -> AsyncIterator[AsyncEngine]:
    reason = await _postgres_unavailable(postgres_url())
    if reason is not None:
        pytest.skip(reason)
    engine = make_engine(postgres_url())
    async with engine.begin() as connection:
        await connection.execute(text(f"CREATE TABLE {TABLE} (id int PRIMARY KEY)"))
        await connection.execute(text(f"INSERT INTO {TABLE} VALUES (1), (2)"))
    try:
        yield engine
    finally:
        async with engine.begin() as connection:
            await connection.execute(text(f"DROP TABLE {TABLE}"))
        await engine.dispose()


async def update_row(connection: AsyncConnection, row: int) -> None:
    await connection.execute(text(f"UPDATE {TABLE} SET id = id WHERE id = :r"), {"r": row})


@pytest.mark.postgres
@pytest.mark.parametrize("setting", ["lock_timeout", "statement_timeout"])
async def test_a_postgres_lock_wait_past_its_timeout_is_contention(pg: AsyncEngine, setting: str):
    async with pg.connect() as holding, pg.connect() as waiting:
        await update_row(holding, 1)
        await waiting.execute(text(f"SET {setting} = '{TIMEOUT}'"))
        with pytest.raises(DBAPIError) as raised:
            await update_row(waiting, 1)
        await holding.rollback()
    assert is_contention(raised.value) and not is_unreachable(raised.value)


@pytest.mark.postgres
async def test_a_postgres_deadlock_victim_is_contention(pg: AsyncEngine):
    async with pg.connect() as one, pg.connect() as two:
        await update_row(one, 1)
        await update_row(two, 2)
        results = await asyncio.gather(
            update_row(one, 2), update_row(two, 1), return_exceptions=True
        )
        await one.rollback()
        await two.rollback()
    victims = [r for r in results if isinstance(r, BaseException)]
    assert len(victims) == 1 and isinstance(victims[0], DBAPIError)
    assert is_contention(victims[0]) and not is_unreachable(victims[0])


@pytest.mark.postgres
async def test_a_cancelled_postgres_statement_is_contention(pg: AsyncEngine):
    async with pg.connect() as holding, pg.connect() as waiting, pg.connect() as admin:
        await update_row(holding, 1)
        pid = (await waiting.execute(text("SELECT pg_backend_pid()"))).scalar()
        blocked = asyncio.ensure_future(update_row(waiting, 1))
        query = text("SELECT count(*) FROM pg_locks WHERE pid = :pid AND NOT granted")
        while not (await admin.execute(query, {"pid": pid})).scalar():
            await asyncio.sleep(0.01)  # polling pg_locks: the server offers no wait for this
        await admin.execute(text("SELECT pg_cancel_backend(:pid)"), {"pid": pid})
        with pytest.raises(DBAPIError) as raised:
            await blocked
        await holding.rollback()
    assert is_contention(raised.value) and not is_unreachable(raised.value)


@pytest.mark.postgres
async def test_a_statement_past_the_client_command_timeout_stays_an_outage(pg: AsyncEngine):
    """asyncpg's command_timeout: the server did not answer in time, whatever the reason."""
    impatient = make_engine(postgres_url(), command_timeout_s=0.2)
    try:
        with pytest.raises(DBAPIError) as raised:
            async with impatient.connect() as connection:
                await connection.execute(text("SELECT pg_sleep(2)"))
    finally:
        await impatient.dispose()
    assert is_unreachable(raised.value) and not is_contention(raised.value)
