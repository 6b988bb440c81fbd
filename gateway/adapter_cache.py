"""The engine's host-memory adapter cache, sized in bytes rather than in adapters.

vLLM keeps loaded adapters in an LRU counted in adapters (max_cpu_loras), so a rank-256 adapter
costs the same slot as a rank-4 one. The gateway therefore owns the policy: before a request
reaches the engine its adapter version is loaded explicitly (timed, counted) and pinned until
the request ends; when the bytes held exceed the budget, the least recently used unpinned
versions are removed from the engine. vLLM also caps the count (max_cpu_loras), and its own
`add_lora` at that cap would evict vLLM's least recently used adapter whatever the gateway's pins
say: the cache therefore makes room before it loads, so vLLM never evicts behind its back and
the residency it reports is true.

A retired or deleted version (`forget`) is never served again: new requests for it are refused
(also one that resolved it just before and is still loading it), and the engine keeps it only
until its last running request ends. vLLM reloads a removed adapter from its path at the next
step of any request that still uses it, and a deleted version's files are gone: removing it
under a running request would kill the engine for every tenant.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from gateway.engine.client import AdapterHandle, EngineClient, EngineDead
from gateway.errors import EngineUnavailable, LoraplexError, ModelNotFound
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


@dataclass
class _Loading:
    done: asyncio.Event
    size_bytes: int


class HostAdapterCache:
    def __init__(self, engine: EngineClient, budget_bytes: int, max_adapters: int | None = None):
        self._engine = engine
        self._budget = budget_bytes
        self._max_adapters = max_adapters
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._loading: dict[int, _Loading] = {}
        self._bytes = 0
        # Retired or deleted version ids: never loaded or pinned again. Version ids are never
        # reused (deleted versions stay as tombstones), so this only grows by retirements.
        self._forgotten: set[int] = set()
        self._removals: set[asyncio.Task[bool]] = set()

    @property
    def resident_bytes(self) -> int:
        return self._bytes

    def resident(self) -> list[int]:
        return list(self._entries)

    async def acquire(self, adapter: AdapterHandle, labels: tuple[str, str]) -> None:
        """Make `adapter` resident and pin it until `release`. Concurrent first requests for
        one version share a single load. A version forgotten meanwhile is refused as unknown:
        `labels[0]` (its adapter's name) is the model the error names."""
        version_id = adapter.engine_id
        while True:
            if version_id in self._forgotten:
                raise ModelNotFound(labels[0])
            entry = self._entries.get(version_id)
            if entry is not None:
                entry.pins += 1
                self._entries.move_to_end(version_id)
                return
            pending = self._loading.get(version_id)
            if pending is None:
                break
            await pending.done.wait()  # then pin what it loaded, or try again if it failed
        loading = self._loading[version_id] = _Loading(asyncio.Event(), adapter.size_bytes)
        try:
            await self._evict(reason="capacity", incoming=True)
            await self._load(adapter, labels)
            if version_id in self._forgotten:  # retired while it loaded
                await self._remove(version_id, reason="retired")
                raise ModelNotFound(labels[0])
            self._entries[version_id].pins += 1
        finally:
            del self._loading[version_id]
            loading.done.set()
        try:  # pins released meanwhile may let it get back within the budget now
            await self._evict(reason="capacity", incoming=False)
        except BaseException:  # cancelled: the caller never learns it holds a pin
            self.release(adapter)
            raise

    def release(self, adapter: AdapterHandle) -> None:
        version_id = adapter.engine_id
        entry = self._entries.get(version_id)
        if entry is None or entry.pins == 0:
            return
        entry.pins -= 1
        if entry.pins == 0 and version_id in self._forgotten:
            # The last request of a retired version ended: out of the engine now.
            task = asyncio.get_running_loop().create_task(
                self._remove(version_id, reason="retired")
            )
            self._removals.add(task)
            task.add_done_callback(self._removals.discard)

    async def forget(self, version_id: int) -> None:
        """A retired or deleted version: refused from now on, and out of the engine as soon as
        no running request holds it (at once when none does)."""
        self._forgotten.add(version_id)
        entry = self._entries.get(version_id)
        if entry is not None and entry.pins > 0:
            return  # release() removes it after the last one
        await self._remove(version_id, reason="retired")

    def forgotten(self, version_id: int) -> bool:
        return version_id in self._forgotten

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

    def _over_budget(self, incoming: bool) -> bool:
        """Over the byte budget or vLLM's count, counting the loads in flight when a load is
        about to start (`incoming`): room is made before vLLM's add_lora, which would
        otherwise evict vLLM's own least recently used adapter, pinned or not."""
        size = len(self._entries) + (len(self._loading) if incoming else 0)
        held = self._bytes + (sum(x.size_bytes for x in self._loading.values()) if incoming else 0)
        return held > self._budget or (self._max_adapters is not None and size > self._max_adapters)

    async def _evict(self, *, reason: str, incoming: bool) -> None:
        while self._over_budget(incoming):
            victim = next((vid for vid, e in self._entries.items() if e.pins == 0), None)
            if victim is None:
                # Everything resident is in use: run over budget rather than fail requests.
                logger.warning(
                    "adapter host cache over budget (%d bytes / %d adapters), all in use",
                    self._bytes,
                    len(self._entries),
                )
                return
            if not await self._remove(victim, reason=reason):
                return

    async def _remove(self, version_id: int, *, reason: str) -> bool:
        """Out of the cache and the engine; False when the engine is gone."""
        entry = self._entries.pop(version_id, None)
        if entry is not None:
            self._bytes -= entry.size_bytes
            ADAPTER_EVICTIONS.labels(TIER, reason).inc()
            self._publish()
        try:
            await self._engine.remove_adapter(version_id)
        except EngineDead:
            return False
        except Exception:  # not loaded: nothing to unload
            logger.debug("engine had no adapter %s to remove", version_id, exc_info=True)
        return True

    def _publish(self) -> None:
        ADAPTERS_RESIDENT.labels(TIER).set(len(self._entries))
        ADAPTER_RESIDENT_BYTES.labels(TIER).set(self._bytes)
