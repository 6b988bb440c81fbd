"""The engine's host-memory adapter cache, sized in bytes rather than in adapters.

vLLM keeps loaded adapters in an LRU counted in adapters (max_cpu_loras), so a rank-256 adapter
costs the same slot as a rank-4 one. The gateway therefore owns the policy: before a request
reaches the engine its adapter version is loaded explicitly (timed, counted) and pinned until
the request ends; when the bytes held exceed the budget, the least recently used unpinned
versions are removed from the engine. vLLM also caps the count (max_cpu_loras), and its own
`add_lora` at that cap would evict vLLM's least recently used adapter whatever the gateway's pins
say: the cache therefore makes room before it loads, so vLLM never evicts behind its back and
the residency it reports is true. The count is a hard cap: when every resident adapter is pinned
by a request still in the engine, a load for another one waits for a pin to be released (at
most `wait_s`, then a 503). Loading anyway made vLLM evict a pinned adapter, which it then
reloaded from its files inside an engine step: blocking every tenant's step, and killing the
engine when the version had been deleted meanwhile. The byte budget stays soft (vLLM does not
count bytes): over it with everything in use, the cache runs over budget rather than wait.

With an engine that loads adapters on arrival (kernels.engine_core_loads) a request follows its
load without awaiting the answer (an engine step boundary, +8-9 ms TTFT p50 on a first use); a
failed load's requests are refused (finish reason "error") and learn why from the load.

A retired or deleted version (`forget`) is never served again: new requests for it are refused
(also one that resolved it just before and is still waiting for the engine to load it; one sent
with its load in flight is already the engine's to serve or refuse), and the engine keeps it only
until its last running request ends. vLLM reloads a removed adapter from its path at the next
step of any request that still uses it, and a deleted version's files are gone: removing it
under a running request would kill the engine for every tenant.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable
from dataclasses import dataclass

from gateway.adapter_loads import (
    AdapterCapacityFull,
    AdapterLoadFailed,
    CacheEntry,
    retrieve_quietly,
)
from gateway.engine.client import AdapterHandle, EngineClient, EngineDead, EngineStalled
from gateway.errors import EngineUnavailable, ModelNotFound
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


# How long a request waits for a host-cache slot when every resident adapter is in use.
ADAPTER_WAIT_S = 30.0


@dataclass
class _Loading:
    done: asyncio.Event
    size_bytes: int
    # The loader found no slot in time: the requests waiting on its load get the same answer
    # (each taking a fresh wait after it made the k-th one wait k times as long).
    full: AdapterCapacityFull | None = None


class HostAdapterCache:
    def __init__(
        self,
        engine: EngineClient,
        budget_bytes: int,
        max_adapters: int | None = None,
        wait_s: float = ADAPTER_WAIT_S,
    ):
        self._engine = engine
        self._budget = budget_bytes
        self._max_adapters = max_adapters
        self._wait_s = wait_s
        self._entries: OrderedDict[int, CacheEntry] = OrderedDict()
        self._loading: dict[int, _Loading] = {}
        # Loads past the room check: version id -> bytes. They count against the caps until
        # they are entries (or failed), so concurrent loads make room for each other.
        self._reserved: dict[int, int] = {}
        # Loads waiting for a slot, first come first served: a release wakes the head only,
        # and a newcomer queues behind them (it would otherwise take the slot first).
        self._waiters: deque[asyncio.Event] = deque()
        self._bytes = 0
        # Retired or deleted version ids: never loaded or pinned again. Version ids are never
        # reused (deleted versions stay as tombstones), so this only grows by retirements.
        self._forgotten: set[int] = set()
        self._removals: set[asyncio.Task[bool]] = set()
        self._loads: set[asyncio.Task[None]] = set()  # held: the loop keeps weak references

    @property
    def resident_bytes(self) -> int:
        return self._bytes

    def resident(self) -> list[int]:
        return list(self._entries)

    def known(self) -> list[int]:
        """Versions resident or on their way in (loading, or waiting for a slot)."""
        return [*self._entries, *(v for v in self._loading if v not in self._entries)]

    async def acquire(
        self, adapter: AdapterHandle, labels: tuple[str, str]
    ) -> asyncio.Task[None] | None:
        """Make `adapter` resident and pin it until `release`. Concurrent first requests for
        one version share a single load. A version forgotten meanwhile is refused as unknown:
        `labels[0]` (its adapter's name) is the model the error names.

        With an engine that loads adapters on arrival, returns the load still in flight (None
        once it answered): the caller sends its request at once, and if the engine refuses it,
        `load_failure` of this says whether the load was why."""
        version_id = adapter.engine_id
        while True:
            if version_id in self._forgotten:
                raise ModelNotFound(labels[0])
            entry = self._entries.get(version_id)
            if entry is not None:
                entry.pins += 1
                self._entries.move_to_end(version_id)
                if entry.failed or entry.unsure:
                    entry.failed = entry.unsure = False
                    entry.load = self._load_alongside(adapter, labels, entry)
                return entry.load
            pending = self._loading.get(version_id)
            if pending is None:
                break
            await pending.done.wait()  # then pin what it loaded, or try again if it failed
            if pending.full is not None:
                raise AdapterCapacityFull(pending.full.message)
        loading = self._loading[version_id] = _Loading(asyncio.Event(), adapter.size_bytes)
        try:
            try:
                await self._make_room(adapter, labels)
            except AdapterCapacityFull as full:
                loading.full = full
                raise
            if self._engine.loads_adapters_on_arrival:
                del self._reserved[version_id]
                entry = self._enter(adapter)
                entry.pins += 1
                entry.load = self._load_alongside(adapter, labels, entry)
                return entry.load
            try:
                await self._engine_load(adapter, labels)
                self._enter(adapter)
            finally:
                del self._reserved[version_id]  # an entry now, or nothing if it failed
                self._room_changed()
            if version_id in self._forgotten:  # retired while it loaded
                await self._remove(version_id, reason="retired")
                raise ModelNotFound(labels[0])
            self._entries[version_id].pins += 1
        finally:
            del self._loading[version_id]
            loading.done.set()
        try:  # pins released meanwhile may let it get back within the budget now
            await self._evict(reason="capacity")
        except BaseException:  # cancelled: the caller never learns it holds a pin
            self.release(adapter)
            raise
        return None

    def release(self, adapter: AdapterHandle) -> None:
        version_id = adapter.engine_id
        entry = self._entries.get(version_id)
        if entry is None or entry.pins == 0:
            return
        entry.pins -= 1
        if entry.pins == 0 and entry.failed:  # the engine holds nothing to remove
            self._drop(version_id)
            return
        if entry.pins == 0:
            self._room_changed()
        if entry.pins == 0 and entry.load is None and version_id in self._forgotten:
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
        for turn in self._waiters:  # a load of it waiting for a slot gives up now
            turn.set()
        entry = self._entries.get(version_id)
        if entry is not None and entry.in_use:
            return  # release() or its load's end removes it after the last one
        await self._remove(version_id, reason="retired")

    def forgotten(self, version_id: int) -> bool:
        return version_id in self._forgotten

    def _load_alongside(
        self, adapter: AdapterHandle, labels: tuple[str, str], entry: CacheEntry
    ) -> asyncio.Task[None]:
        """A version's engine load, sent now (ahead of the requests sent after it, in order on
        one socket) and answered in its own task. A failed load leaves the engine holding
        nothing: the entry goes, or fails until its pins do. A stalled one stays counted."""
        version_id = adapter.engine_id
        answer = self._engine.start_adapter_load(adapter)

        async def load() -> None:
            try:
                await self._engine_load(adapter, labels, answer)
            except BaseException as exc:
                entry.load = None
                if self._entries.get(version_id) is not entry:
                    raise
                if isinstance(exc.__cause__, EngineStalled):
                    entry.unsure = True
                    await self._load_ended(version_id, entry)
                elif entry.pins:
                    entry.failed = True
                else:
                    self._drop(version_id)
                raise
            entry.load = None
            await self._load_ended(version_id, entry)

        task = asyncio.get_running_loop().create_task(load())
        self._loads.add(task)
        task.add_done_callback(retrieve_quietly)
        task.add_done_callback(self._loads.discard)
        return task

    async def _load_ended(self, version_id: int, entry: CacheEntry) -> None:
        """Its load answered (or never will): a retired version with no request left goes."""
        if self._entries.get(version_id) is not entry:
            return  # removed while it loaded (forgotten with no request left)
        if version_id in self._forgotten and entry.pins == 0:
            await self._remove(version_id, reason="retired")
        else:  # in use until now: it may be over the budget
            self._room_changed()
            await self._evict(reason="capacity")

    async def _engine_load(
        self, adapter: AdapterHandle, labels: tuple[str, str], answer: Awaitable[None] | None = None
    ) -> None:
        started = time.perf_counter()
        try:
            await (self._engine.add_adapter(adapter) if answer is None else answer)
        except EngineDead as exc:
            raise EngineUnavailable("The inference engine is unavailable.") from exc
        except Exception as exc:
            ADAPTER_LOADS.labels(*labels, "error").inc()
            logger.exception("loading adapter %s (version id %s)", labels[0], adapter.engine_id)
            raise AdapterLoadFailed("The adapter could not be loaded into the engine.") from exc
        ADAPTER_LOAD_DURATION.observe(time.perf_counter() - started)
        ADAPTER_LOADS.labels(*labels, "ok").inc()
        ADAPTER_LOAD_BYTES.inc(adapter.size_bytes)

    def _drop(self, version_id: int) -> None:
        """Out of the cache without an engine call: the engine does not hold it."""
        entry = self._entries.pop(version_id)
        self._bytes -= entry.size_bytes
        self._publish()
        self._room_changed()

    def _enter(self, adapter: AdapterHandle) -> CacheEntry:
        entry = self._entries[adapter.engine_id] = CacheEntry(adapter.size_bytes)
        self._bytes += adapter.size_bytes
        self._publish()
        return entry

    def _over_count(self, extra: int) -> bool:
        if self._max_adapters is None:
            return False
        return len(self._entries) + len(self._reserved) + extra > self._max_adapters

    def _over_bytes(self, extra: int) -> bool:
        return self._bytes + sum(self._reserved.values()) + extra > self._budget

    async def _make_room(self, adapter: AdapterHandle, labels: tuple[str, str]) -> None:
        """Evict until `adapter` fits beside the resident and reserved ones, then reserve it.
        Room is made before vLLM's add_lora, which would otherwise evict vLLM's own least
        recently used adapter, pinned or not. While every resident adapter is pinned the
        count cannot give: wait in line for a release, at most `wait_s`. A version forgotten
        meanwhile is refused before it costs another adapter its place."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_s
        turn: asyncio.Event | None = None
        try:
            while True:
                if turn is None and self._waiters:
                    turn = self._queue()  # others were first
                if turn is None or turn is self._waiters[0]:
                    if not await self._evict(reason="capacity", extra=(1, adapter.size_bytes)):
                        raise EngineUnavailable("The inference engine is unavailable.")
                    if adapter.engine_id in self._forgotten:
                        raise ModelNotFound(labels[0])
                    if not self._over_count(1):
                        break
                    if turn is None:
                        turn = self._queue()
                remaining = deadline - loop.time()
                if remaining <= 0:
                    logger.warning(
                        "adapter %s waited %.0f s for a host cache slot: all %d in use",
                        labels[0],
                        self._wait_s,
                        len(self._entries) + len(self._reserved),
                    )
                    raise AdapterCapacityFull(
                        "Every adapter slot of the engine is in use by running requests; "
                        "retry shortly."
                    )
                turn.clear()
                # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation
                # that lands as the wait ends, and a caller whose client hung up would take
                # the slot and keep its pin with nobody left to release it.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await turn.wait()
                if adapter.engine_id in self._forgotten:
                    raise ModelNotFound(labels[0])
            if self._over_bytes(adapter.size_bytes):
                logger.warning(
                    "adapter host cache over budget (%d bytes / %d adapters), all in use",
                    self._bytes,
                    len(self._entries),
                )
            self._reserved[adapter.engine_id] = adapter.size_bytes
        finally:
            if turn is not None:
                self._waiters.remove(turn)
                self._room_changed()  # the next in line tries now

    def _queue(self) -> asyncio.Event:
        turn = asyncio.Event()
        self._waiters.append(turn)
        return turn

    def _room_changed(self) -> None:
        """A pin or an entry went, or the head of the line left: the head tries now."""
        if self._waiters:
            self._waiters[0].set()

    async def _evict(self, *, reason: str, extra: tuple[int, int] = (0, 0)) -> bool:
        """Remove least recently used unpinned versions while the cache, with `extra`
        (adapters, bytes) about to come, is over the count or the byte budget; False when
        the engine is gone."""
        count, size = extra
        while self._over_count(count) or self._over_bytes(size):
            victim = next((vid for vid, e in self._entries.items() if not e.in_use), None)
            if victim is None:
                return True  # everything resident is in use: the caller decides
            if not await self._remove(victim, reason=reason):
                return False
        return True

    async def _remove(self, version_id: int, *, reason: str) -> bool:
        """Out of the cache and the engine; False when the engine is gone."""
        entry = self._entries.pop(version_id, None)
        if entry is not None:
            self._bytes -= entry.size_bytes
            ADAPTER_EVICTIONS.labels(TIER, reason).inc()
            self._publish()
            self._room_changed()
        if self._engine.loads_adapters_on_arrival:
            # Sent now, ahead of the load it makes room for (one socket, in order): nothing
            # has to wait for the answer, and a dead engine fails that load.
            removal = asyncio.ensure_future(self._engine.start_adapter_removal(version_id))
            removal.add_done_callback(retrieve_quietly)
            return True
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
