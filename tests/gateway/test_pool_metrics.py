"""Engine pool snapshots become loraplex_* gauges and counter increments: counters move by
what the engine counted since the last scrape, and an engine that restarted from zero does
not make them go backwards."""

from __future__ import annotations

import asyncio

import httpx
from prometheus_client import REGISTRY

from gateway.pool_metrics import PoolMetrics
from tests.gateway.fake_engine import ADMIN_TOKEN, ScriptedEngine, client_for


def snapshot(**changes: object) -> dict[str, object]:
    base = {
        "page_size": 4,
        "pages_total": 32,
        "pages_used": 10,
        "pages_free": 22,
        "bytes_per_page": 1000,
        # pages of different layer groups differ in size: resident bytes are the engine's
        # exact count, not pages x bytes_per_page
        "bytes_total": 30_000,
        "bytes_used": 9_500,
        "slots_total": 16,
        "adapters_resident": 3,
        "page_ins_total": 5,
        "page_outs_total": 2,
        "pages_in_total": 12,
        "pages_out_total": 2,
        "bytes_in_total": 12_000,
        "evictions_for_space_total": 1,
        "refusals_total": 0,
        "group_pages": {
            "qkv_proj": {"total": 20, "used": 8},
            "down_proj": {"total": 12, "used": 2},
        },
    }
    return {**base, **changes}


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_snapshots_become_gauges_and_increments():
    before = {
        "ins": value("loraplex_adapter_page_ins_total"),
        "outs": value("loraplex_adapter_page_outs_total"),
        "bytes": value("loraplex_adapter_page_in_bytes_total"),
        "evicted": value("loraplex_adapter_evictions_total", tier="device", reason="capacity"),
    }

    def moved(key: str, name: str, **labels: str) -> float:
        return value(name, **labels) - before[key]

    metrics = PoolMetrics()
    metrics.update(None)  # no paged pool: nothing reported, nothing breaks
    metrics.update(snapshot())
    # per layer group: the sums add pages of different sizes
    assert value("loraplex_adapter_pool_pages", group="qkv_proj", state="used") == 8
    assert value("loraplex_adapter_pool_pages", group="qkv_proj", state="free") == 12
    assert value("loraplex_adapter_pool_pages", group="down_proj", state="free") == 10
    assert value("loraplex_adapters_resident", tier="device") == 3
    assert value("loraplex_adapter_resident_bytes", tier="device") == 9_500
    assert moved("ins", "loraplex_adapter_page_ins_total") == 5

    groups = {"qkv_proj": {"total": 20, "used": 4}, "down_proj": {"total": 12, "used": 0}}
    metrics.update(snapshot(page_ins_total=9, bytes_in_total=20_000, group_pages=groups))
    assert moved("ins", "loraplex_adapter_page_ins_total") == 9  # +4, not +9 again
    assert moved("bytes", "loraplex_adapter_page_in_bytes_total") == 20_000
    assert value("loraplex_adapter_pool_pages", group="qkv_proj", state="used") == 4

    restarted = snapshot(page_ins_total=2, page_outs_total=0, evictions_for_space_total=0)
    metrics.update(restarted)
    assert moved("ins", "loraplex_adapter_page_ins_total") == 11  # the new engine's 2
    assert moved("outs", "loraplex_adapter_page_outs_total") == 2
    evictions = moved(
        "evicted", "loraplex_adapter_evictions_total", tier="device", reason="capacity"
    )
    assert evictions == 1


def test_residency_waits_become_histogram_observations():
    name = "loraplex_adapter_residency_wait_seconds"
    count, total = value(f"{name}_count"), value(f"{name}_sum")
    below_1s = value(f"{name}_bucket", le="1.0")
    metrics = PoolMetrics()
    metrics.observe_waits([])  # nothing waited since the last scrape
    metrics.observe_waits([0.25, 3.0])
    assert value(f"{name}_count") - count == 2
    assert abs(value(f"{name}_sum") - total - 3.25) < 1e-9
    assert value(f"{name}_bucket", le="1.0") - below_1s == 1


class PagedEngine(ScriptedEngine):
    """Paged mode whose counter grows by one page-in per snapshot; the first scrape's RPC
    after `slow_call` snapshots is slow, so a second scrape overtakes it."""

    def __init__(self, slow_call: int) -> None:
        super().__init__(["a"])
        self.page_ins = 100
        self.calls = 0
        self.slow_call = slow_call

    async def adapter_pool(self) -> dict[str, object]:
        self.calls += 1
        self.page_ins += 1
        taken = snapshot(page_ins_total=self.page_ins, page_outs_total=0, bytes_in_total=0)
        if self.calls == self.slow_call:
            await asyncio.sleep(0.3)
        return taken


def test_overlapping_scrapes_count_each_page_in_once(tmp_path):
    """Two scrapes at once (an HA Prometheus pair): the one holding the older snapshot finished
    last, its counter looked like an engine restarted from zero, and the whole counter was
    added again (review). Through the app's /metrics route."""
    from gateway.demo import build_base

    build_base(tmp_path / "base")
    engine = PagedEngine(slow_call=2)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with client_for(tmp_path, engine) as client:
        assert client.get("/metrics", headers=admin).status_code == 200
        start = value("loraplex_adapter_page_ins_total")
        first = engine.page_ins

        async def two_at_once() -> list[int]:
            transport = httpx.ASGITransport(app=client.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
                slow = asyncio.ensure_future(http.get("/metrics", headers=admin))
                await asyncio.sleep(0.05)  # the slow one has taken its snapshot
                fast = await http.get("/metrics", headers=admin)
                return [(await slow).status_code, fast.status_code]

        assert client.portal.call(two_at_once) == [200, 200]
    assert engine.page_ins == first + 2
    assert value("loraplex_adapter_page_ins_total") - start == 2
