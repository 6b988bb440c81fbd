"""Fixtures for end-to-end tests that need more than the session gateway."""

from __future__ import annotations

import asyncio
import uuid

import openai
import pytest
from sqlalchemy import make_url

from tests.registry.conftest import _postgres_unavailable, postgres_url


async def _admin_sql(statement: str) -> None:
    import asyncpg

    url = make_url(postgres_url()).set(drivername="postgresql")
    connection = await asyncpg.connect(url.render_as_string(hide_password=False), timeout=5)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@pytest.fixture
def postgres_database():
    """A database of its own (dropped afterwards): the gateway migrates it from empty."""
    reason = asyncio.run(_postgres_unavailable(postgres_url()))
    if reason is not None:
        pytest.skip(reason)
    name = f"loraplex_e2e_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin_sql(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(postgres_url()).set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(_admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def aclient(gateway):
    """The official async client on the session gateway, with tenant `demo`'s key."""
    async with openai.AsyncOpenAI(
        base_url=gateway.v1, api_key=gateway.api_key, max_retries=0, timeout=120
    ) as client:
        yield client
