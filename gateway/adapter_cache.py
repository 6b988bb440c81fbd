"""The engine's host-memory adapter cache, sized in bytes rather than in adapters.

vLLM keeps loaded adapters in an LRU counted in adapters (max_cpu_loras), so a rank-256 adapter
costs the same slot as a rank-4 one. The gateway therefore owns the policy: before a request
reaches the engine its adapter version is loaded explicitly (timed, counted) and pinned until
the request ends; when the bytes held exceed the budget, the least recently used unpinned
versions are removed from the engine. vLLM also caps the count (max_cpu_loras); the cache keeps
within that too, so vLLM never evicts behind its back and the residency it reports is true.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from gateway.engine.client import AdapterHandle, EngineClient, EngineDead
from gateway.errors import EngineUnavailable, LoraplexError
from gateway.metrics import (
    ADAPTER_EVICTIONS,
    ADAPTER_LOAD_BYTES,
    ADAPTER_LOAD_DURATION,
    ADAPTER_LOADS,
    ADAPTER_RESIDENT_BYTES,
    ADAPTERS_RESIDENT,
)

logger = logging.getLogger(__name__)
TIER = "host"


class AdapterLoadFailed(LoraplexError):
    status_code = 500
    error_type = "server_error"
    code = "adapter_load_failed"


@dataclass
class _Entry:
    size_bytes: int
    pins: int = 0


class HostAdapterCache:
    def __init__(self, engine: EngineClient, budget_bytes: int, max_adapters: int | None = None):
        self._engine = engine
        self._budget = budget_bytes
        self._max_adapters = max_adapters
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._loading: dict[int, asyncio.Event] = {}
        self._bytes = 0

    @property
    def resident_bytes(self) -> int:
        return self._bytes

    def resident(self) -> list[int]:
        return list(self._entries)

    async def acquire(self, adapter: AdapterHandle, labels: tuple[str, str]) -> None:
        """Make `adapter` resident and pin it until `release`. Concurrent first requests for
        one version share a single load."""
        version_id = adapter.engine_id
        while True:
            entry = self._entries.get(version_id)
            if entry is not None:
                entry.pins += 1
                self._entries.move_to_end(version_id)
                return
            pending = self._loading.get(version_id)
            if pending is None:
                break
            await pending.wait()  # then pin what it loaded, or try again if it failed
        done = asyncio.Event()
        self._loading[version_id] = done
        try:
            await self._load(adapter, labels)
            self._entries[version_id].pins += 1
        finally:
            del self._loading[version_id]
            done.set()
        await self._evict_over_budget()

    def release(self, adapter: AdapterHandle) -> None:
        entry = self._entries.get(adapter.engine_id)
        if entry is not None and entry.pins > 0:
            entry.pins -= 1

    async def forget(self, version_id: int) -> None:
        """A retired or deleted version: out of the engine now, pins or not (the registry no
        longer resolves it, so no new request can pin it again)."""
        entry = self._entries.pop(version_id, None)
        if entry is not None:
            self._bytes -= entry.size_bytes
            ADAPTER_EVICTIONS.labels(TIER, "retired").inc()
            self._publish()
        try:
            await self._engine.remove_adapter(version_id)
        except Exception:  # not loaded, or engine gone: nothing to unload either way
            logger.debug("engine had no adapter %s to remove", version_id, exc_info=True)

    async def _load(self, adapter: AdapterHandle, labels: tuple[str, str]) -> None:
        started = time.perf_counter()
        try:
            await self._engine.add_adapter(adapter)
        except EngineDead as exc:
            raise EngineUnavailable("The inference engine is unavailable.") from exc
        except Exception as exc:
            ADAPTER_LOADS.labels(*labels, "error").inc()
            logger.exception("loading adapter %s (version id %s)", labels[0], adapter.engine_id)
            raise AdapterLoadFailed("The adapter could not be loaded into the engine.") from exc
        ADAPTER_LOAD_DURATION.observe(time.perf_counter() - started)
        ADAPTER_LOADS.labels(*labels, "ok").inc()
        ADAPTER_LOAD_BYTES.inc(adapter.size_bytes)
        self._entries[adapter.engine_id] = _Entry(adapter.size_bytes)
        self._bytes += adapter.size_bytes
        self._publish()

    async def _evict_over_budget(self) -> None:
        while self._bytes > self._budget or (
            self._max_adapters is not None and len(self._entries) > self._max_adapters
        ):
            victim = next((vid for vid, e in self._entries.items() if e.pins == 0), None)
            if victim is None:
                # Everything resident is in use: run over budget rather than fail requests.
                logger.warning(
                    "adapter host cache over budget (%d bytes / %d adapters), all in use",
                    self._bytes,
                    len(self._entries),
                )
                return
            entry = self._entries.pop(victim)
            self._bytes -= entry.size_bytes
            ADAPTER_EVICTIONS.labels(TIER, "capacity").inc()
            self._publish()
            try:
                await self._engine.remove_adapter(victim)
            except EngineDead:
                return
            except Exception:
                logger.debug("engine had no adapter %s to remove", victim, exc_info=True)

    def _publish(self) -> None:
        ADAPTERS_RESIDENT.labels(TIER).set(len(self._entries))
        ADAPTER_RESIDENT_BYTES.labels(TIER).set(self._bytes)
