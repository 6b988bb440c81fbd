"""Real artifacts for the registry tests: a tiny Llama checkpoint with its own tokenizer, and
real peft adapters saved from it. Built once per session (a few seconds on 2 cores) and copied
by each test that mutates one.

Database fixtures run every service test against SQLite and PostgreSQL. PostgreSQL is skipped,
with the reason shown, only when no server answers at LORAPLEX_TEST_POSTGRES_URL (default
postgresql+asyncpg://postgres@127.0.0.1:5432/test). Each test module gets its own fresh schema.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from registry.compat.fingerprint import BaseModelFingerprint, fingerprint_base_model
from registry.db import make_engine, make_session_factory, migrate
from registry.store.local import LocalArtifactStore
from tests.registry.helpers import build_adapter, build_base
from tests.registry.rollout_world import World, make_world

DEFAULT_PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def artifacts_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registry-artifacts")


@pytest.fixture(scope="session")
def tiny_base(artifacts_root: Path) -> Path:
    return build_base(artifacts_root / "base")


@pytest.fixture(scope="session")
def base_fp(tiny_base: Path) -> BaseModelFingerprint:
    return fingerprint_base_model(tiny_base)


@pytest.fixture(scope="session")
def make_adapter(artifacts_root: Path, tiny_base: Path) -> Callable[..., Path]:
    """make_adapter(key, base=None, safe=True, **LoraConfig kwargs) → a cached, read-only-by-
    convention adapter folder; copy it (copy_adapter) before mutating."""
    built: dict[str, Path] = {}

    def make(key: str, *, base: Path | None = None, safe: bool = True, **lora: Any) -> Path:
        if key not in built:
            built[key] = build_adapter(
                base or tiny_base, artifacts_root / "adapters" / key, safe=safe, **lora
            )
        return built[key]

    return make


@pytest.fixture(scope="session")
def good_adapter(make_adapter: Callable[..., Path]) -> Path:
    return make_adapter("good")


@pytest.fixture
def copy_adapter(tmp_path: Path) -> Callable[[Path], Path]:
    def copy(src: Path) -> Path:
        dst = tmp_path / f"adapter-{uuid.uuid4().hex[:8]}"
        shutil.copytree(src, dst)
        return dst

    return copy


# ---------------------------------------------------------------------------- databases


def postgres_url() -> str:
    return os.environ.get("LORAPLEX_TEST_POSTGRES_URL", DEFAULT_PG_URL)


async def _postgres_unavailable(url: str) -> str | None:
    import asyncpg

    plain = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        connection = await asyncpg.connect(plain, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"no PostgreSQL server answers at {make_url(url)!r}: {exc}"
    await connection.close()
    return None


DATABASES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@asynccontextmanager
async def fresh_database(
    kind: str, tmp_path_factory: pytest.TempPathFactory, *, migrated: bool = True
) -> AsyncIterator[AsyncEngine]:
    """A new SQLite file or PostgreSQL schema (dropped afterwards), migrated to head unless
    `migrated` is False. Skips the test when PostgreSQL is wanted but no server answers."""
    if kind == "sqlite":
        db = tmp_path_factory.mktemp("sqlite") / "registry.db"
        url = f"sqlite+aiosqlite:///{db}"
        if migrated:
            await migrate(url)  # the gateway's path: migrate by URL, then open the engine
        engine = make_engine(url)
        try:
            yield engine
        finally:
            await engine.dispose()
        return
    url = postgres_url()
    reason = await _postgres_unavailable(url)
    if reason:
        pytest.skip(reason)
    schema = f"loraplex_test_{uuid.uuid4().hex[:12]}"
    admin = make_engine(url)
    async with admin.begin() as connection:
        await connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine = make_engine(url, connect_args={"server_settings": {"search_path": schema}})
    try:
        if migrated:
            await migrate(engine)
        yield engine
    finally:
        await engine.dispose()
        async with admin.begin() as connection:
            await connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await admin.dispose()


@pytest.fixture(scope="module", params=DATABASES)
async def engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[AsyncEngine]:
    """A migrated database per test module: a SQLite file, or a fresh PostgreSQL schema."""
    async with fresh_database(request.param, tmp_path_factory) as engine:
        yield engine


@pytest.fixture(params=DATABASES)
async def blank_engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[AsyncEngine]:
    """An empty database per test (no tables at all), for migration tests."""
    async with fresh_database(request.param, tmp_path_factory, migrated=False) as engine:
        yield engine


TABLES = (
    "dataset_ngram_filters",
    "feedback_verdicts",
    "rollout_events",
    "audit_log",
    "adapter_shares",
    "api_keys",
    "adapter_versions",
    "adapters",
    "tenants",
    "base_models",
)


@pytest.fixture
async def sessions(engine: AsyncEngine) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    yield make_session_factory(engine)
    async with engine.begin() as connection:
        for table in TABLES:
            await connection.execute(text(f"DELETE FROM {table}"))


@pytest.fixture
async def session(sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    async with sessions() as session:
        yield session


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "store")


@pytest.fixture
async def world(session, store, base_fp, make_adapter) -> World:
    """A base model and tenants acme and globex, ready for rollout tests (rollout_world)."""
    return await make_world(session, store, base_fp, make_adapter)
