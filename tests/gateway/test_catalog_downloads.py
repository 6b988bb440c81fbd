"""The catalog never holds a database connection while an adapter's files are fetched: with an
S3 store a first request for `name@N` (every canary and fallback target resolves that way)
downloads for seconds, and twenty of those at once held twenty pooled connections idle in
transaction, so the next tenant's key check waited for the pool and failed. On SQLite and the
real PostgreSQL, with a store whose downloads wait until the test lets them finish."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.catalog import RegistryCatalog
from gateway.registry_runtime import RegistryRuntime, import_adapter_dir, open_registry
from gateway.settings import Settings
from registry.service import Principal
from registry.tenancy import TenantPolicy
from tests.gateway.rollout_helpers import build_demo_root
from tests.gateway.test_registry_runtime import database_url

REQUESTS = 20


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = build_demo_root(tmp_path_factory.mktemp("downloads"))
    shutil.copytree(root / "v1", root / "import" / "slow")
    return root


# A scratch SQLite file or PostgreSQL database per test (the registry runtime tests' own).
__all__ = ["database_url"]


@pytest.fixture
async def runtime(demo_root, tmp_path, database_url) -> AsyncIterator[RegistryRuntime]:
    settings = Settings(base_model=demo_root / "base", data_dir=tmp_path, database_url=database_url)
    runtime = await open_registry(settings, demo_root / "base", "downloads-base")
    await import_adapter_dir(runtime, demo_root / "import", "acme")
    yield runtime
    await runtime.close()


class HeldDownloads:
    """The runtime's store, whose get_path waits for `release` and notes how many pooled
    connections were checked out when it was called."""

    def __init__(self, runtime: RegistryRuntime):
        self._store, self._pool = runtime.store, runtime.db.pool
        self.release = asyncio.Event()
        self.checked_out: list[int] = []

    async def get_path(self, digest: str) -> Path:
        self.checked_out.append(self._pool.checkedout())  # type: ignore[attr-defined]
        await self.release.wait()
        return await self._store.get_path(digest)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


async def test_pinned_versions_are_fetched_with_no_connection_held(runtime):
    store = HeldDownloads(runtime)
    runtime.store = store  # type: ignore[assignment]
    catalog = RegistryCatalog(runtime, cache_ttl_s=30)
    acme = Principal("acme", 0, "key-acme", TenantPolicy(), None)
    requests = [asyncio.ensure_future(catalog.resolve("slow@1", acme)) for _ in range(REQUESTS)]
    # More requests than the pool has connections (5 + 10): all of them reach the download.
    for _ in range(1500):
        if len(store.checked_out) == REQUESTS:
            break
        await asyncio.sleep(0.01)
    assert len(store.checked_out) == REQUESTS
    assert runtime.db.pool.checkedout() == 0  # type: ignore[attr-defined]
    store.release.set()
    served = await asyncio.gather(*requests)
    assert {s.version for s in served} == {1}
    assert all(Path(s.adapter.path, "adapter_config.json").exists() for s in served)

    catalog.invalidate()  # alone: its own session is closed before its download starts
    store.checked_out.clear()
    await catalog.resolve("slow@1", acme)
    assert store.checked_out == [0]
