"""The catalog's per-tenant scope: a burst of first requests for many names reads the tenant's
adapters once (one query), not once per name; anything the snapshot lacks (a name registered
since, `name@N`) still resolves on its own, so a snapshot never turns a real adapter into a 404;
scope still holds (another tenant's private adapter stays unknown); and an invalidation while
the snapshot is read keeps it, and the names resolved from it, out of the cache."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from gateway.catalog import RegistryCatalog
from gateway.errors import ModelNotFound
from gateway.registry_runtime import RegistryRuntime, import_adapter_dir, open_registry
from gateway.settings import Settings
from registry import service
from registry.service import Principal
from registry.tenancy import TenantPolicy
from tests.gateway.rollout_helpers import build_demo_root

NAMES = [f"scope-{i:02d}" for i in range(12)]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = build_demo_root(tmp_path_factory.mktemp("scope"))
    for i, name in enumerate(NAMES):  # two real adapters, each under six names
        shutil.copytree(root / f"v{i % 2 + 1}", root / "import" / name)
    return root


@pytest.fixture
async def runtime(demo_root, tmp_path) -> RegistryRuntime:
    settings = Settings(base_model=demo_root / "base", data_dir=tmp_path / "data")
    runtime = await open_registry(settings, demo_root / "base", "scope-base")
    await import_adapter_dir(runtime, demo_root / "import", "acme")
    yield runtime
    await runtime.close()


class Counted:
    """Counts the registry reads the catalog makes."""

    def __init__(self, monkeypatch):
        self.calls = {"list_resolvable": 0, "resolve_adapter": 0}
        for name in self.calls:
            original = getattr(service, name)

            async def counted(*args, _original=original, _name=name, **kwargs):
                self.calls[_name] += 1
                return await _original(*args, **kwargs)

            monkeypatch.setattr(service, name, counted)


def caller(tenant: str) -> Principal:
    return Principal(tenant, 0, f"key-{tenant}", TenantPolicy(), None)


async def test_a_burst_of_first_requests_reads_the_tenant_once(runtime, monkeypatch):
    counted = Counted(monkeypatch)
    catalog = RegistryCatalog(runtime, cache_ttl_s=30)
    served = await asyncio.gather(*(catalog.resolve(n, caller("acme")) for n in NAMES))
    assert [s.name for s in served] == NAMES and all(s.adapter for s in served)
    assert counted.calls == {"list_resolvable": 1, "resolve_adapter": 0}
    assert all(Path(s.adapter.path, "adapter_config.json").exists() for s in served)


async def test_what_the_snapshot_lacks_is_resolved_on_its_own(runtime, demo_root, monkeypatch):
    catalog = RegistryCatalog(runtime, cache_ttl_s=30)
    await catalog.resolve(NAMES[0], caller("acme"))  # the scope is read and held
    async with runtime.sessions() as session:  # registered behind the catalog's back
        await service.register_adapter_version(
            session,
            store=runtime.store,
            artifact_dir=demo_root / "v2",
            name="scope-late",
            tenant="acme",
            served_base=runtime.base,
            max_lora_rank=runtime.max_lora_rank,
            actor="another-replica",
        )
    counted = Counted(monkeypatch)
    late = await catalog.resolve("scope-late", caller("acme"))
    assert late.adapter is not None and late.version == 1
    exact = await catalog.resolve(f"{NAMES[1]}@1", caller("acme"))
    assert exact.adapter is not None and exact.version == 1
    assert counted.calls == {"list_resolvable": 0, "resolve_adapter": 2}
    with pytest.raises(ModelNotFound):  # acme's private adapters are not globex's
        await catalog.resolve(NAMES[2], caller("globex"))
    with pytest.raises(ModelNotFound):
        await catalog.resolve("scope-missing", caller("acme"))


async def test_an_invalidation_during_the_read_keeps_the_stale_snapshot_out(runtime, monkeypatch):
    catalog = RegistryCatalog(runtime, cache_ttl_s=30)
    started, release = asyncio.Event(), asyncio.Event()
    original = service.list_resolvable

    async def slow(*args, **kwargs):
        started.set()
        await release.wait()
        return await original(*args, **kwargs)

    monkeypatch.setattr(service, "list_resolvable", slow)
    first = asyncio.create_task(catalog.resolve(NAMES[0], caller("acme")))
    await started.wait()
    catalog.invalidate()  # a change was seen while the old scope was being read
    release.set()
    assert (await first).adapter is not None  # the request itself is served
    counted = Counted(monkeypatch)
    await catalog.resolve(NAMES[0], caller("acme"))
    # read again: neither the stale scope nor the name resolved from it was kept
    assert counted.calls["list_resolvable"] == 1
