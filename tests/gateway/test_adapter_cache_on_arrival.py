"""The host adapter cache with an engine that loads adapters on arrival (loraplex's engine
core, kernels.engine_core_loads): a first request goes to the engine with its adapter's load
still in flight, and learns from the load why the engine refused it. The real engine's side is
in tests/kernels/test_engine_core_loads.py and tests/e2e/test_adapter_load_failure.py."""

from __future__ import annotations

import asyncio

import pytest

from gateway.adapter_cache import HostAdapterCache
from gateway.adapter_loads import AdapterLoadFailed, load_failure
from gateway.engine.client import AdapterHandle, EngineDead, EngineError, EngineStalled
from gateway.errors import EngineUnavailable
from gateway.metrics import ADAPTER_LOADS
from tests.gateway.test_adapter_cache import LABELS, handle


class LoadingEngine:
    """Loads take until `answer` is set (the engine core busy with a step)."""

    loads_adapters_on_arrival = True

    def __init__(self, failing: set[int] | None = None, dead: bool = False):
        self.loaded: list[int] = []
        self.removed: list[int] = []
        self.failing = failing or set()
        self.dead = dead
        self.stalled = False
        self.sent: list[tuple[str, int]] = []
        self.answer = asyncio.Event()

    async def add_adapter(self, adapter: AdapterHandle) -> None:
        await self.answer.wait()
        if self.dead:
            raise EngineDead("gone")
        if self.stalled:
            raise EngineStalled("loading an adapter took longer than 120 s")
        if adapter.engine_id in self.failing:
            raise EngineError("bad adapter")
        self.loaded.append(adapter.engine_id)

    def start_adapter_load(self, adapter: AdapterHandle) -> asyncio.Future[None]:
        self.sent.append(("load", adapter.engine_id))
        return asyncio.ensure_future(self.add_adapter(adapter))

    def start_adapter_removal(self, engine_id: int) -> asyncio.Future[None]:
        self.sent.append(("remove", engine_id))  # as the engine core will see them
        return asyncio.ensure_future(self.remove_adapter(engine_id))

    async def remove_adapter(self, engine_id: int) -> None:
        self.removed.append(engine_id)


async def test_a_first_request_goes_on_with_its_load_in_flight_and_shares_it():
    engine = LoadingEngine()
    cache = HostAdapterCache(engine, budget_bytes=1000)  # type: ignore[arg-type]
    first = await asyncio.wait_for(cache.acquire(handle(1), LABELS), 1)  # not the load's answer
    assert first is not None and not first.done()
    assert cache.resident() == [1] and cache.resident_bytes == 100  # counted from now on
    second = await cache.acquire(handle(1), LABELS)
    assert second is first  # one load for both
    engine.answer.set()
    assert await load_failure(first) is None
    assert engine.loaded == [1]
    assert await cache.acquire(handle(1), LABELS) is None  # loaded: nothing in flight


async def test_a_failed_load_is_the_refused_requests_answer_and_leaves_nothing_behind():
    engine = LoadingEngine(failing={5})
    cache = HostAdapterCache(engine, budget_bytes=1000)  # type: ignore[arg-type]
    errors = ADAPTER_LOADS.labels(*LABELS, "error")._value.get()
    load = await cache.acquire(handle(5), LABELS)
    engine.answer.set()
    failure = await load_failure(load)
    assert isinstance(failure, AdapterLoadFailed)
    assert failure.status_code == 500 and failure.code == "adapter_load_failed"
    assert ADAPTER_LOADS.labels(*LABELS, "error")._value.get() == errors + 1
    cache.release(handle(5))  # the refused request ends
    assert cache.resident() == [] and cache.resident_bytes == 0
    engine.failing.clear()
    retry = await cache.acquire(handle(5), LABELS)  # a later request loads it again
    assert retry is not None and retry is not load
    assert await load_failure(retry) is None and cache.resident() == [5]


async def test_a_dead_engine_is_the_refused_requests_503():
    engine = LoadingEngine(dead=True)
    cache = HostAdapterCache(engine, budget_bytes=1000)  # type: ignore[arg-type]
    load = await cache.acquire(handle(2), LABELS)
    engine.answer.set()
    assert isinstance(await load_failure(load), EngineUnavailable)
    cache.release(handle(2))
    assert cache.resident() == []


async def test_a_version_whose_load_is_in_flight_is_never_evicted_even_with_no_request_left():
    """Its request may have gone (client hung up) before the engine answered: removing it
    then would race the load it follows."""
    engine = LoadingEngine()
    cache = HostAdapterCache(engine, budget_bytes=150)  # type: ignore[arg-type]
    load = await cache.acquire(handle(1), LABELS)
    cache.release(handle(1))  # its request is gone; the load is not
    second = await cache.acquire(handle(2), LABELS)  # over budget: 1 may not go yet
    assert engine.removed == [] and cache.resident_bytes == 200
    cache.release(handle(2))
    engine.answer.set()
    await asyncio.wait({t for t in (load, second) if t is not None})
    await asyncio.sleep(0)
    assert engine.removed == [1] and cache.resident() == [2]  # back within budget once loaded


async def test_a_version_forgotten_while_it_loads_with_no_request_left_is_removed_after():
    engine = LoadingEngine()
    cache = HostAdapterCache(engine, budget_bytes=1000)  # type: ignore[arg-type]
    load = await cache.acquire(handle(6), LABELS)
    cache.release(handle(6))
    await cache.forget(6)
    assert engine.removed == [] and cache.resident() == [6]  # the load is still in flight
    engine.answer.set()
    assert load is not None
    await asyncio.wait({load})
    assert engine.removed == [6] and cache.resident() == [] and cache.resident_bytes == 0


async def test_a_caller_cancelled_while_it_awaits_the_load_leaves_the_load_running():
    engine = LoadingEngine()
    cache = HostAdapterCache(engine, budget_bytes=1000)  # type: ignore[arg-type]
    load = await cache.acquire(handle(3), LABELS)
    waiter = asyncio.create_task(load_failure(load))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert load is not None and not load.done()
    engine.answer.set()
    assert await load_failure(load) is None and engine.loaded == [3]


async def test_requests_of_a_failed_load_release_their_own_pins_not_the_next_loads():
    """One entry per version: a request refused with a failed load that released after the
    next request had loaded the version took that request's pin, and the version was evicted
    (vLLM reloading it inside a step) under a running request (review)."""
    engine = LoadingEngine(failing={1})
    cache = HostAdapterCache(engine, budget_bytes=200, max_adapters=2)  # type: ignore[arg-type]
    refused = await cache.acquire(handle(1), LABELS)
    engine.answer.set()
    assert isinstance(await load_failure(refused), AdapterLoadFailed)
    assert cache.resident() == [1]  # held by the refused request, which has not ended yet
    engine.failing.clear()
    running = await cache.acquire(handle(1), LABELS)  # loaded again, on the same entry
    assert running is not None and running is not refused
    assert await load_failure(running) is None
    cache.release(handle(1))  # the refused request ends
    for other in (2, 3):
        await cache.acquire(handle(other), LABELS)
        cache.release(handle(other))
    assert ("remove", 1) not in engine.sent and 1 in cache.resident()  # pinned by `running`
    cache.release(handle(1))
    await cache.acquire(handle(4), LABELS)
    assert engine.sent[-2:] == [("remove", 1), ("load", 4)]  # now it may go


async def test_a_failed_load_leaves_with_its_last_request_without_an_engine_call():
    engine = LoadingEngine(failing={1})
    cache = HostAdapterCache(engine, budget_bytes=1000)  # type: ignore[arg-type]
    load = await cache.acquire(handle(1), LABELS)
    await cache.acquire(handle(1), LABELS)
    engine.answer.set()
    await load_failure(load)
    assert cache.resident_bytes == 100  # counted while requests hold it
    cache.release(handle(1))
    cache.release(handle(1))
    assert cache.resident() == [] and cache.resident_bytes == 0
    assert engine.removed == []  # the engine holds nothing to remove


async def test_a_stalled_load_stays_counted_the_engine_may_still_carry_it_out():
    """No answer in time is not a refusal: the requests sent behind the load may be served
    with it, and forgetting it would leave the engine holding an adapter nobody counts."""
    engine = LoadingEngine()
    engine.stalled = True
    cache = HostAdapterCache(engine, budget_bytes=1000)  # type: ignore[arg-type]
    load = await cache.acquire(handle(1), LABELS)
    engine.answer.set()
    assert isinstance(await load_failure(load), AdapterLoadFailed)
    cache.release(handle(1))
    assert cache.resident() == [1] and cache.resident_bytes == 100
    # The engine may have refused it since (and would refuse every request until the next
    # load): the next request sends a load again, cheap if the engine holds it.
    engine.stalled = False
    again = await cache.acquire(handle(1), LABELS)
    assert again is not None and engine.sent == [("load", 1), ("load", 1)]
    assert await load_failure(again) is None


async def test_a_version_retired_during_a_stalled_load_with_no_request_left_is_removed():
    engine = LoadingEngine()
    engine.stalled = True
    cache = HostAdapterCache(engine, budget_bytes=1000)  # type: ignore[arg-type]
    load = await cache.acquire(handle(1), LABELS)
    cache.release(handle(1))
    await cache.forget(1)
    engine.answer.set()
    await load_failure(load)
    assert engine.sent == [("load", 1), ("remove", 1)] and cache.resident() == []


async def test_room_is_made_by_a_removal_sent_ahead_of_the_load_without_waiting_for_it():
    """Its answer would cost the first request an engine step boundary again; sent first on
    the one socket, the engine core removes before it loads (vLLM's count cap holds)."""
    engine = LoadingEngine()
    engine.answer.set()
    cache = HostAdapterCache(engine, budget_bytes=10**9, max_adapters=2)  # type: ignore[arg-type]
    for vid in (1, 2):
        await load_failure(await cache.acquire(handle(vid), LABELS))
        cache.release(handle(vid))
    engine.remove_adapter = _never_answers  # type: ignore[method-assign]
    load = await asyncio.wait_for(cache.acquire(handle(3), LABELS), 1)
    assert engine.sent == [("load", 1), ("load", 2), ("remove", 1), ("load", 3)]
    assert cache.resident() == [2, 3] and await load_failure(load) is None


async def _never_answers(engine_id: int) -> None:
    await asyncio.Event().wait()
