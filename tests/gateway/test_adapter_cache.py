"""The byte-budgeted host adapter cache: loads once, pins while in use, evicts least recently
used unpinned versions by bytes. The engine here records calls (the real engine's loads are
exercised by every adapter request in tests/e2e)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.adapter_cache import AdapterLoadFailed, HostAdapterCache
from gateway.engine.client import AdapterHandle, EngineError
from gateway.metrics import ADAPTER_EVICTIONS, ADAPTER_RESIDENT_BYTES


class RecordingEngine:
    def __init__(self, load_delay_s: float = 0.0, failing: set[int] | None = None):
        self.loaded: list[int] = []
        self.removed: list[int] = []
        self.delay = load_delay_s
        self.failing = failing or set()

    async def add_adapter(self, adapter: AdapterHandle) -> None:
        await asyncio.sleep(self.delay)
        if adapter.engine_id in self.failing:
            raise EngineError("bad adapter")
        self.loaded.append(adapter.engine_id)

    async def remove_adapter(self, engine_id: int) -> None:
        self.removed.append(engine_id)


def handle(version_id: int, size: int = 100) -> AdapterHandle:
    return AdapterHandle(engine_id=version_id, path=f"/x/{version_id}", size_bytes=size)


LABELS = ("a", "1")


async def test_loads_once_and_evicts_lru_by_bytes():
    engine = RecordingEngine()
    cache = HostAdapterCache(engine, budget_bytes=250)  # type: ignore[arg-type]
    for vid in (1, 2):
        await cache.acquire(handle(vid), LABELS)
        cache.release(handle(vid))
    await cache.acquire(handle(1), LABELS)  # hit: 1 becomes most recent
    cache.release(handle(1))
    assert engine.loaded == [1, 2]
    await cache.acquire(handle(3), LABELS)  # 300 > 250: the least recent (2) goes
    assert engine.removed == [2] and cache.resident() == [1, 3]
    assert cache.resident_bytes == 200
    assert ADAPTER_RESIDENT_BYTES.labels("host")._value.get() == 200


async def test_pinned_versions_are_never_evicted():
    engine = RecordingEngine()
    cache = HostAdapterCache(engine, budget_bytes=150)  # type: ignore[arg-type]
    await cache.acquire(handle(1), LABELS)  # held by a running request
    await cache.acquire(handle(2), LABELS)  # over budget, but 1 is pinned and 2 is in use
    assert engine.removed == [] and cache.resident_bytes == 200
    cache.release(handle(1))
    await cache.acquire(handle(3), LABELS)  # now 1 can go
    assert engine.removed == [1]


async def test_big_adapters_cost_more_than_small_ones():
    engine = RecordingEngine()
    cache = HostAdapterCache(engine, budget_bytes=1000)  # type: ignore[arg-type]
    for vid in range(1, 11):  # ten small ones fit
        await cache.acquire(handle(vid, 100), LABELS)
        cache.release(handle(vid, 100))
    assert engine.removed == []
    await cache.acquire(handle(99, 450), LABELS)  # one big one displaces five small ones
    assert engine.removed == [1, 2, 3, 4, 5]


async def test_the_engine_count_ceiling_binds_too():
    engine = RecordingEngine()
    cache = HostAdapterCache(engine, budget_bytes=10**9, max_adapters=2)  # type: ignore[arg-type]
    for vid in (1, 2, 3):
        await cache.acquire(handle(vid), LABELS)
        cache.release(handle(vid))
    assert engine.removed == [1] and cache.resident() == [2, 3]


async def test_concurrent_first_requests_share_one_load():
    engine = RecordingEngine(load_delay_s=0.05)
    cache = HostAdapterCache(engine, budget_bytes=1000)  # type: ignore[arg-type]
    await asyncio.gather(*(cache.acquire(handle(7), LABELS) for _ in range(5)))
    assert engine.loaded == [7]
    for _ in range(5):
        cache.release(handle(7))
    await cache.acquire(handle(8, 950), LABELS)  # all five pins released: 7 may go
    assert engine.removed == [7]


async def test_a_failed_load_is_an_error_and_leaves_nothing_behind():
    engine = RecordingEngine(failing={5})
    cache = HostAdapterCache(engine, budget_bytes=1000)  # type: ignore[arg-type]
    with pytest.raises(AdapterLoadFailed):
        await cache.acquire(handle(5), LABELS)
    assert cache.resident() == [] and cache.resident_bytes == 0
    engine.failing.clear()
    await cache.acquire(handle(5), LABELS)  # a later request tries again
    assert cache.resident() == [5]


async def test_forget_unloads_a_retired_version_even_if_pinned():
    engine = RecordingEngine()
    cache = HostAdapterCache(engine, budget_bytes=1000)  # type: ignore[arg-type]
    await cache.acquire(handle(4), LABELS)
    before = ADAPTER_EVICTIONS.labels("host", "retired")._value.get()
    await cache.forget(4)
    assert engine.removed == [4] and cache.resident() == []
    assert ADAPTER_EVICTIONS.labels("host", "retired")._value.get() == before + 1
    cache.release(handle(4))  # the request that held it finishing later is harmless
