"""Alembic environment. `registry.db.migrate` passes an open connection in
`config.attributes["connection"]`; the alembic CLI gets its URL from LORAPLEX_DATABASE_URL."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from alembic import context
from sqlalchemy import Connection

from registry.models import Base

config = context.config
target_metadata = Base.metadata


def _configure(**kwargs: Any) -> None:
    # Batch mode lets later ALTERs run on SQLite, which can only rebuild tables.
    context.configure(target_metadata=target_metadata, render_as_batch=True, **kwargs)


def run_with_connection(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_with_url(url: str) -> None:
    from registry.db import make_migration_engine

    engine = make_migration_engine(url)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_with_connection)
            await connection.commit()
    finally:
        await engine.dispose()


def _url() -> str:
    url = config.attributes.get("url") or os.environ.get("LORAPLEX_DATABASE_URL")
    if not url:
        raise RuntimeError("set LORAPLEX_DATABASE_URL to run alembic against a database")
    return str(url)


if context.is_offline_mode():
    _configure(url=_url(), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif (connection := config.attributes.get("connection")) is not None:
    run_with_connection(connection)
else:
    asyncio.run(run_with_url(_url()))
