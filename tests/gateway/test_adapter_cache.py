"""The byte-budgeted host adapter cache: loads once, pins while in use, evicts least recently
used unpinned versions by bytes. The engine here records calls (the real engine's loads are
exercised by every adapter request in tests/e2e)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.adapter_cache import HostAdapterCache
from gateway.adapter_loads import AdapterLoadFailed
from gateway.engine.client import AdapterHandle, EngineError
from gateway.errors import ModelNotFound
from gateway.metrics import ADAPTER_EVICTIONS, ADAPTER_RESIDENT_BYTES


class RecordingEngine:
    loads_adapters_on_arrival = False  # every load is awaited before its request goes

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


async def test_a_forgotten_version_is_unloaded_at_once_when_nothing_holds_it():
    engine = RecordingEngine()
    cache = HostAdapterCache(engine, budget_bytes=1000)  # type: ignore[arg-type]
    await cache.acquire(handle(4), LABELS)
    cache.release(handle(4))
    before = ADAPTER_EVICTIONS.labels("host", "retired")._value.get()
    await cache.forget(4)
    assert engine.removed == [4] and cache.resident() == [] and cache.resident_bytes == 0
    assert ADAPTER_EVICTIONS.labels("host", "retired")._value.get() == before + 1


async def test_a_forgotten_version_stays_loaded_until_its_last_request_ends():
    """vLLM reloads a removed adapter from its path at the next step of a request still using
    it, and a deleted version's files are gone: that killed the engine for every tenant."""
    engine = RecordingEngine()
    cache = HostAdapterCache(engine, budget_bytes=1000)  # type: ignore[arg-type]
    await cache.acquire(handle(4), LABELS)  # two requests running on it
    await cache.acquire(handle(4), LABELS)
    await cache.forget(4)
    assert engine.removed == [] and cache.resident() == [4]
    with pytest.raises(ModelNotFound):  # but no new request pins it
        await cache.acquire(handle(4), ("bot", "1"))
    cache.release(handle(4))
    await asyncio.sleep(0)
    assert engine.removed == []  # one still running
    cache.release(handle(4))
    await asyncio.sleep(0)
    assert engine.removed == [4] and cache.resident() == [] and cache.resident_bytes == 0


async def test_a_version_forgotten_while_it_loads_is_not_left_resident():
    """A request resolved the version just before it was retired and was still loading it."""
    engine = RecordingEngine(load_delay_s=0.05)
    cache = HostAdapterCache(engine, budget_bytes=1000)  # type: ignore[arg-type]
    loading = asyncio.create_task(cache.acquire(handle(6), ("bot", "1")))
    await asyncio.sleep(0.01)
    await cache.forget(6)
    with pytest.raises(ModelNotFound):
        await loading
    assert cache.resident() == [] and cache.resident_bytes == 0
    assert engine.loaded == [6] and engine.removed[-1] == 6


class VllmLru(RecordingEngine):
    """vLLM's own CPU adapter cache: at its capacity (max_cpu_loras) `add_lora` first removes
    vLLM's least recently used adapter, whatever the gateway holds pinned."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.held: list[int] = []

    async def add_adapter(self, adapter: AdapterHandle) -> None:
        await super().add_adapter(adapter)
        if len(self.held) + 1 > self.capacity:
            self.held.pop(0)
        self.held.append(adapter.engine_id)

    async def remove_adapter(self, engine_id: int) -> None:
        await super().remove_adapter(engine_id)
        if engine_id in self.held:
            self.held.remove(engine_id)


async def test_room_is_made_before_a_load_so_vllm_never_evicts_a_pinned_adapter():
    engine = VllmLru(capacity=2)
    cache = HostAdapterCache(engine, budget_bytes=10**9, max_adapters=2)  # type: ignore[arg-type]
    await cache.acquire(handle(1), LABELS)  # its request still queued in the engine: pinned
    await cache.acquire(handle(2), LABELS)
    cache.release(handle(2))
    await cache.acquire(handle(3), LABELS)
    assert engine.removed == [2]  # the unpinned one, before 3 was loaded
    assert cache.resident() == engine.held == [1, 3]


async def test_concurrent_loads_make_room_for_each_other():
    engine = VllmLru(capacity=3)
    engine.delay = 0.01
    cache = HostAdapterCache(engine, budget_bytes=10**9, max_adapters=3)  # type: ignore[arg-type]
    await cache.acquire(handle(1), LABELS)  # pinned throughout
    for vid in (2, 3):
        await cache.acquire(handle(vid), LABELS)
        cache.release(handle(vid))
    await asyncio.gather(*(cache.acquire(handle(vid), LABELS) for vid in (4, 5)))
    assert engine.removed == [2, 3]
    assert sorted(cache.resident()) == sorted(engine.held) == [1, 4, 5]


class SlowRemoval(RecordingEngine):
    async def remove_adapter(self, engine_id: int) -> None:
        await asyncio.sleep(10)


async def test_a_request_cancelled_while_the_cache_evicts_leaves_no_pin_behind():
    """The pin is taken before the eviction that follows a load; a caller cancelled there
    never learns it holds one, and the version could never be evicted again."""
    engine = SlowRemoval(load_delay_s=0.05)
    cache = HostAdapterCache(engine, budget_bytes=150)  # type: ignore[arg-type]
    await cache.acquire(handle(1), LABELS)
    second = asyncio.create_task(cache.acquire(handle(2), LABELS))  # 200 > 150, 1 is pinned
    await asyncio.sleep(0.01)
    cache.release(handle(1))  # now 1 may go: the eviction after 2's load removes it, slowly
    await asyncio.sleep(0.1)
    assert 1 not in cache.resident()  # being removed
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    assert cache._entries[2].pins == 0


async def test_with_every_slot_pinned_a_load_waits_for_a_release_instead_of_evicting_one():
    """Loading anyway made vLLM evict a pinned adapter, reloaded from its files inside an
    engine step (fatal once that version was deleted)."""
    engine = VllmLru(capacity=2)
    cache = HostAdapterCache(engine, budget_bytes=10**9, max_adapters=2)  # type: ignore[arg-type]
    for vid in (1, 2):
        await cache.acquire(handle(vid), LABELS)  # both requests still in the engine
    third = asyncio.create_task(cache.acquire(handle(3), LABELS))
    await asyncio.sleep(0.05)
    assert not third.done() and engine.loaded == [1, 2] and engine.held == [1, 2]
    cache.release(handle(2))
    await asyncio.wait_for(third, 1)
    assert engine.removed == [2] and cache.resident() == engine.held == [1, 3]


async def test_a_load_that_finds_no_free_slot_in_time_is_a_503_and_leaves_nothing_behind():
    from gateway.adapter_loads import AdapterCapacityFull

    engine = VllmLru(capacity=1)
    cache = HostAdapterCache(engine, 10**9, max_adapters=1, wait_s=0.05)  # type: ignore[arg-type]
    await cache.acquire(handle(1), LABELS)
    with pytest.raises(AdapterCapacityFull) as refused:
        await cache.acquire(handle(2), LABELS)
    assert refused.value.status_code == 503 and refused.value.headers() == {"Retry-After": "1"}
    assert engine.loaded == [1] and not cache._reserved and not cache._loading
    cache.release(handle(1))
    await cache.acquire(handle(2), LABELS)  # the slot is free now
    assert cache.resident() == engine.held == [2]


async def test_a_request_cancelled_while_it_waits_for_a_slot_reserves_nothing():
    engine = VllmLru(capacity=1)
    cache = HostAdapterCache(engine, budget_bytes=10**9, max_adapters=1)  # type: ignore[arg-type]
    await cache.acquire(handle(1), LABELS)
    waiting = asyncio.create_task(cache.acquire(handle(2), LABELS))
    await asyncio.sleep(0.02)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not cache._reserved and not cache._loading
    cache.release(handle(1))
    await cache.acquire(handle(3), LABELS)
    assert cache.resident() == engine.held == [3]


async def test_a_failed_load_gives_its_slot_to_the_next_waiting_one():
    engine = VllmLru(capacity=2)
    engine.failing = {2}
    engine.delay = 0.02
    cache = HostAdapterCache(engine, budget_bytes=10**9, max_adapters=2)  # type: ignore[arg-type]
    await cache.acquire(handle(1), LABELS)
    failing = asyncio.create_task(cache.acquire(handle(2), LABELS))  # takes the last slot
    await asyncio.sleep(0)
    third = asyncio.create_task(cache.acquire(handle(3), LABELS))  # waits for it
    with pytest.raises(AdapterLoadFailed):
        await failing
    await asyncio.wait_for(third, 1)
    assert cache.resident() == engine.held == [1, 3] and engine.removed == []


async def test_requests_waiting_on_a_load_that_found_no_slot_get_its_answer_not_a_new_wait():
    """Each follower became the next loader with a fresh wait: the k-th waited k x wait_s."""
    from gateway.adapter_loads import AdapterCapacityFull

    engine = RecordingEngine()
    cache = HostAdapterCache(engine, 10**9, max_adapters=1, wait_s=0.3)  # type: ignore[arg-type]
    await cache.acquire(handle(1), LABELS)  # pinned throughout
    loop = asyncio.get_running_loop()
    started = loop.time()
    results = await asyncio.gather(
        *(cache.acquire(handle(2), LABELS) for _ in range(4)), return_exceptions=True
    )
    assert all(isinstance(r, AdapterCapacityFull) for r in results), results
    assert loop.time() - started < 0.6


async def test_a_slot_goes_to_the_load_that_waited_longest():
    """A release woke every waiter, and a request arriving in the same turn took the slot."""
    engine = RecordingEngine()
    cache = HostAdapterCache(engine, 10**9, max_adapters=1, wait_s=5)  # type: ignore[arg-type]
    await cache.acquire(handle(1), LABELS)
    first = asyncio.create_task(cache.acquire(handle(2), LABELS))
    await asyncio.sleep(0.02)
    cache.release(handle(1))
    later = asyncio.create_task(cache.acquire(handle(3), LABELS))  # right after the release
    await asyncio.wait_for(first, 1)
    await asyncio.sleep(0.02)
    assert not later.done() and engine.loaded == [1, 2]
    cache.release(handle(2))
    await asyncio.wait_for(later, 1)
    assert engine.loaded == [1, 2, 3]


async def test_a_version_forgotten_while_it_waits_for_a_slot_is_never_loaded():
    engine = RecordingEngine()
    cache = HostAdapterCache(engine, 10**9, max_adapters=1, wait_s=5)  # type: ignore[arg-type]
    await cache.acquire(handle(1), LABELS)
    waiting = asyncio.create_task(cache.acquire(handle(2), LABELS))
    await asyncio.sleep(0.02)
    assert cache.known() == [1, 2]  # what a replica checks against the registry
    await cache.forget(2)  # retired or deleted while its request waits
    with pytest.raises(ModelNotFound):
        await asyncio.wait_for(waiting, 1)
    cache.release(handle(1))
    assert engine.loaded == [1] and cache.resident() == [1]  # 1 was not evicted for it


async def test_a_dead_engine_is_a_503_engine_unavailable_at_once_not_a_wait():
    from gateway.engine.client import EngineDead
    from gateway.errors import EngineUnavailable

    class Dead(RecordingEngine):
        async def remove_adapter(self, engine_id: int) -> None:
            raise EngineDead("gone")

    cache = HostAdapterCache(Dead(), 10**9, max_adapters=1, wait_s=5)  # type: ignore[arg-type]
    await cache.acquire(handle(1), LABELS)
    cache.release(handle(1))
    with pytest.raises(EngineUnavailable):
        await asyncio.wait_for(cache.acquire(handle(2), LABELS), 1)


@pytest.mark.parametrize("depth", range(4))
@pytest.mark.parametrize("disconnect_first", [True, False])
async def test_a_client_gone_as_its_slot_frees_leaves_no_pin_behind(depth, disconnect_first):
    """The hang-up and the release land in the same loop turns: wait_for swallowed the
    cancellation (Python 3.11), prepare went on to take the slot and its job was dropped with
    the pin held, a slot lost for good."""
    from gateway.http_utils import ClientDisconnected, until_disconnected

    loop = asyncio.get_running_loop()

    class Request:
        def __init__(self) -> None:
            self.gone: asyncio.Future[None] = loop.create_future()

        async def receive(self) -> dict[str, str]:
            await self.gone
            return {"type": "http.disconnect"}

    cache = HostAdapterCache(RecordingEngine(), 10**9, max_adapters=1)  # type: ignore[arg-type]
    await cache.acquire(handle(1), LABELS)  # every slot in use
    request = Request()

    async def prepare() -> str:
        await cache.acquire(handle(2), LABELS)
        return "job"

    route = asyncio.ensure_future(
        until_disconnected(request, prepare(), discard=lambda job: cache.release(handle(2)))  # type: ignore[arg-type]
    )
    for _ in range(5):
        await asyncio.sleep(0)  # waiting in line for the slot

    def later(steps: int, act) -> None:  # type: ignore[no-untyped-def]
        if steps == 0:
            act()
        else:
            loop.call_soon(later, steps - 1, act)

    release = lambda: cache.release(handle(1))  # noqa: E731
    hang_up = lambda: request.gone.set_result(None)  # noqa: E731
    first, second = (hang_up, release) if disconnect_first else (release, hang_up)
    first()
    later(depth, second)
    try:
        assert await route == "job"  # served: the client was still there when it finished
        cache.release(handle(2))
    except ClientDisconnected:
        pass
    assert all(entry.pins == 0 for entry in cache._entries.values()), cache._entries
