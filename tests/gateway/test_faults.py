"""Fault injection rules: only the named version is touched; clear removes what it names."""

from __future__ import annotations

import random
import time

import pytest

from gateway.faults import Fault, FaultInjector, InjectedFault


async def test_latency_and_errors_hit_only_the_named_version():
    injector = FaultInjector(random.Random(0))
    injector.set("bot", 2, Fault(latency_ms=50))
    injector.set("bot", 3, Fault(error_rate=1.0))
    started = time.perf_counter()
    await injector.apply("bot", 2)
    assert time.perf_counter() - started >= 0.045
    with pytest.raises(InjectedFault) as info:
        await injector.apply("bot", 3)
    assert info.value.status_code == 500 and info.value.code == "injected_fault"
    started = time.perf_counter()
    await injector.apply("bot", 1)  # other versions, other adapters and the base: untouched
    await injector.apply("other", 2)
    await injector.apply("", None)
    assert time.perf_counter() - started < 0.04


async def test_error_rate_is_a_probability():
    injector = FaultInjector(random.Random(7))
    injector.set("bot", 1, Fault(error_rate=0.3))
    failures = 0
    for _ in range(1000):
        try:
            await injector.apply("bot", 1)
        except InjectedFault:
            failures += 1
    assert 230 < failures < 370


def test_clear_by_scope():
    injector = FaultInjector()
    for adapter, version in [("a", 1), ("a", 2), ("b", 1)]:
        injector.set(adapter, version, Fault(latency_ms=1))
    assert injector.clear("a", 2) == 1
    assert set(injector.active()) == {("a", 1), ("b", 1)}
    assert injector.clear("a") == 1 and injector.clear() == 1 and injector.active() == {}


@pytest.mark.parametrize("bad", [{"latency_ms": -1}, {"error_rate": 1.5}, {"error_rate": -0.1}])
def test_invalid_faults_are_refused(bad):
    with pytest.raises(ValueError):
        Fault(**bad)
