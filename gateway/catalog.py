"""Where servable models come from: the base plus adapters, resolved by the name clients send.

The gateway asks a ModelCatalog, never the file system, which adapter a `model` names. The
registry-backed catalog answers from the database, so a version registered through the admin API
is servable on the next request and a retired one is gone, without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gateway.engine.client import AdapterHandle
from gateway.errors import ModelNotFound
from gateway.registry_runtime import RegistryRuntime
from registry import service
from registry.compat import EngineLimits, inspect_adapter, run_gate
from registry.errors import InvalidName, NotFound

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """One entry of /v1/models: the base (adapter None) or an adapter on it."""

    name: str
    adapter: AdapterHandle | None
    created: int
    parent: str | None = None
    owned_by: str = "loraplex"


class ModelCatalog(Protocol):
    async def list_models(self) -> list[ServedModel]: ...

    async def resolve(self, name: str) -> ServedModel:
        """Raises ModelNotFound for anything that is not servable."""
        ...


class RegistryCatalog:
    """The served base plus every servable adapter version bound to it in the registry."""

    def __init__(self, runtime: RegistryRuntime, cache_ttl_s: float = 1.0):
        self._runtime = runtime
        self._base = ServedModel(name=runtime.base_name, adapter=None, created=int(time.time()))
        self._verified: set[int] = set()
        # name → (expiry, resolution). A database round trip per request costs the API process
        # more than the rest of the gateway's work; admin writes in this process invalidate at
        # once, other replicas' writes show within the TTL. Misses are never cached, so a new
        # version is servable on the very next request everywhere.
        self._ttl = cache_ttl_s
        self._cache: dict[str, tuple[float, ServedModel]] = {}

    async def list_models(self) -> list[ServedModel]:
        runtime = self._runtime
        async with runtime.sessions() as session:
            resolved = await service.list_resolvable(
                session, store=runtime.store, base_sha256=runtime.base.weights_sha256
            )
        adapters = [
            ServedModel(r.name, None, int(r.created_at.timestamp()), parent=self._base.name)
            for r in resolved
        ]
        return [self._base, *adapters]

    async def resolve(self, name: str) -> ServedModel:
        if name == self._base.name:
            return self._base
        cached = self._cache.get(name)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        served = await self._resolve_uncached(name)
        self._cache[name] = (now + self._ttl, served)
        return served

    def invalidate(self) -> None:
        self._cache.clear()

    async def _resolve_uncached(self, name: str) -> ServedModel:
        runtime = self._runtime
        try:
            async with runtime.sessions() as session:
                resolved = await service.resolve_adapter(
                    session,
                    store=runtime.store,
                    model=name,
                    base_sha256=runtime.base.weights_sha256,
                )
        except (NotFound, InvalidName):
            raise ModelNotFound(name) from None
        if resolved.path is None:
            raise ModelNotFound(name)
        await self._gate_before_first_load(resolved.version_id, resolved.address, resolved.path)
        handle = AdapterHandle(engine_id=resolved.version_id, path=str(resolved.path))
        return ServedModel(
            name, handle, int(resolved.created_at.timestamp()), parent=self._base.name
        )

    async def _gate_before_first_load(self, version_id: int, address: str, path: Path) -> None:
        """Re-run the whole gate on the stored files once per version and process: what reaches
        the engine is what passed, even if the store was tampered with since registration."""
        if version_id in self._verified:
            return
        runtime = self._runtime
        artifact = await asyncio.to_thread(inspect_adapter, path)
        problems = run_gate(artifact, runtime.base, EngineLimits(runtime.max_lora_rank))
        if problems:
            logger.error("refusing to load %s: %s", address, "; ".join(p.message for p in problems))
            raise ModelNotFound(address.split("@")[0])
        self._verified.add(version_id)

    def forget(self, version_id: int) -> None:
        self._verified.discard(version_id)
        self.invalidate()
