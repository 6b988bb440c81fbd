"""An unreachable PostgreSQL fails fast and says so: connecting is bounded (asyncpg's own default
is 60 s, which a black-holed host used in full on every request), so is each statement, and
whichever way the failure arrives it is an OperationalError that `is_unreachable` recognises,
while a refused statement is not mistaken for an outage."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import make_url, text
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from registry.db import (
    CONNECT_TIMEOUT_S,
    POOL_TIMEOUT_S,
    is_unreachable,
    make_engine,
    make_migration_engine,
)
from tests.registry.conftest import _postgres_unavailable, postgres_url

pytestmark = pytest.mark.postgres


@pytest.fixture
async def pg_url() -> str:
    reason = await _postgres_unavailable(postgres_url())
    if reason is not None:
        pytest.skip(reason)
    return postgres_url()


@pytest.fixture
async def black_hole() -> AsyncIterator[int]:
    """A port that accepts connections and never answers on them (a partition, a failover
    in progress): the port."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in held:
            writer.close()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def at_port(url: str, port: int) -> str:
    return make_url(url).set(host="127.0.0.1", port=port).render_as_string(False)


async def test_a_black_holed_host_fails_within_the_connect_timeout(pg_url, black_hole):
    engine = make_engine(at_port(pg_url, black_hole))
    started = time.monotonic()
    try:
        with pytest.raises(OperationalError) as raised:
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
    finally:
        await engine.dispose()
    assert CONNECT_TIMEOUT_S - 0.5 < time.monotonic() - started < CONNECT_TIMEOUT_S + 5
    assert is_unreachable(raised.value)


async def test_a_refused_connection_is_an_operational_error(pg_url):
    engine = make_engine(at_port(pg_url, closed_port()))
    try:
        with pytest.raises(OperationalError) as raised:
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
    finally:
        await engine.dispose()
    assert is_unreachable(raised.value)


async def test_a_statement_past_its_timeout_fails_and_the_pool_recovers(pg_url):
    engine = make_engine(pg_url, command_timeout_s=0.5)
    try:
        with pytest.raises(OperationalError) as raised:
            async with engine.connect() as connection:
                await connection.execute(text("SELECT pg_sleep(5)"))
        assert is_unreachable(raised.value)
        async with engine.connect() as connection:
            assert (await connection.execute(text("SELECT 1"))).scalar() == 1
        assert engine.pool.timeout() == POOL_TIMEOUT_S  # type: ignore[attr-defined]
    finally:
        await engine.dispose()


async def test_migrations_have_no_statement_timeout(pg_url):
    """A replica waits on the migration lock as long as another replica's upgrade takes."""
    engine = make_migration_engine(pg_url)
    try:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT pg_sleep(0.1)"))
            raw = await connection.get_raw_connection()
            assert raw.driver_connection._config.command_timeout is None  # type: ignore[union-attr]
    finally:
        await engine.dispose()


async def test_refused_statements_are_not_outages(pg_url):
    engine = make_engine(pg_url)
    try:
        async with engine.connect() as connection:
            with pytest.raises(ProgrammingError) as syntax:
                await connection.execute(text("SELEC 1"))
            await connection.rollback()
            await connection.execute(text("CREATE TEMPORARY TABLE once (id int PRIMARY KEY)"))
            await connection.execute(text("INSERT INTO once VALUES (1)"))
            with pytest.raises(IntegrityError) as duplicate:
                await connection.execute(text("INSERT INTO once VALUES (1)"))
    finally:
        await engine.dispose()
    assert not is_unreachable(syntax.value)
    assert not is_unreachable(duplicate.value)
