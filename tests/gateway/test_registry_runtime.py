"""Replicas starting together against one registry all start, and leave it as one start would.

A Kubernetes rollout starts several gateways at once on an empty database. Each pins the
served base, creates the start-up tenant, imports the adapter folder and registers the
operator's chosen key; every one of those is a look-up followed by an insert, which a replica
starting beside it can win. CI saw the base pin fail that way (tests/e2e/test_rollout_replicas).
Run on SQLite and on the real PostgreSQL, each replica with its own engine, as in production.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlalchemy import make_url

from gateway.registry_runtime import ensure_start_key, import_adapter_dir, open_registry
from gateway.settings import Settings
from registry import service
from tests.e2e.conftest import _admin_sql
from tests.gateway.rollout_helpers import build_demo_root
from tests.registry.conftest import _postgres_unavailable, postgres_url

REPLICAS = 4
NAMES = [f"boot-{i}" for i in range(4)]
CHOSEN_KEY = "lpx-start-key-" + "k" * 32


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = build_demo_root(tmp_path_factory.mktemp("boot"))
    for i, name in enumerate(NAMES):
        shutil.copytree(root / f"v{i % 2 + 1}", root / "import" / name)
    return root


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def database_url(request, tmp_path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"
        return
    reason = await _postgres_unavailable(postgres_url())
    if reason is not None:
        pytest.skip(reason)
    name = f"loraplex_boot_{uuid.uuid4().hex[:10]}"
    await _admin_sql(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(postgres_url()).set(database=name).render_as_string(hide_password=False)
    finally:
        await _admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def start_replica(demo_root: Path, data_dir: Path, url: str) -> str:
    settings = Settings(base_model=demo_root / "base", data_dir=data_dir, database_url=url)
    runtime = await open_registry(settings, demo_root / "base", "boot-base")
    try:
        key = await ensure_start_key(runtime, "acme", SecretStr(CHOSEN_KEY))
        await import_adapter_dir(runtime, demo_root / "import", "acme")
        return key
    finally:
        await runtime.close()


async def test_replicas_starting_together_all_start(demo_root, tmp_path, database_url) -> None:
    keys = await asyncio.gather(
        *(start_replica(demo_root, tmp_path / f"r{i}", database_url) for i in range(REPLICAS))
    )
    assert keys == [CHOSEN_KEY] * REPLICAS
    # ... and leave what one start leaves: one base, one tenant, one version per adapter,
    # one key that authenticates as the tenant's.
    settings = Settings(base_model=demo_root / "base", data_dir=tmp_path / "check")
    runtime = await open_registry(
        settings.model_copy(update={"database_url": database_url}), demo_root / "base", "boot-base"
    )
    try:
        async with runtime.sessions() as session:
            assert [b.name for b in await service.list_base_models(session)] == ["boot-base"]
            for name in NAMES:
                versions = await service.list_versions(session, name=name)
                assert [v.version for v in versions] == [1], name
            principal = await service.authenticate_api_key(session, presented=CHOSEN_KEY)
            assert principal.tenant == "acme"
            audit = await service.list_audit(session)
            created = [e for e in audit if e.action in ("tenant.create", "key.create")]
            assert sorted(e.action for e in created) == ["key.create", "tenant.create"]
    finally:
        await runtime.close()
