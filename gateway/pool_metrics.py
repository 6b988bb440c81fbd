"""The engine's paged adapter pool (kernels/README.md, LORAPLEX_PAGED_LORA) as loraplex_*
metrics. The engine keeps plain counters (kernels.paged_stats); the /metrics route reads a
snapshot at scrape time and this turns it into gauges and counter increments, so everything
stays in gateway/metrics.py and aggregates like the rest under several workers.

Scrapes may overlap (two Prometheus servers, a retry): each takes its snapshot and applies it
under one lock, in order. Otherwise a scrape whose older snapshot is applied after a newer one
reads the engine's counter as gone back to zero (a restart) and adds all of it again."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import Counter

from gateway.engine.client import EngineClient
from gateway.metrics import (
    ADAPTER_EVICTIONS,
    ADAPTER_PAGE_IN_BYTES,
    ADAPTER_PAGE_INS,
    ADAPTER_PAGE_OUTS,
    ADAPTER_POOL_PAGES,
    ADAPTER_RESIDENCY_WAIT,
    ADAPTER_RESIDENT_BYTES,
    ADAPTERS_RESIDENT,
)

TIER = "device"
# engine counter (kernels.paged_stats.PagedPoolStats field) -> loraplex counter
_COUNTERS: dict[str, Counter] = {
    "page_ins_total": ADAPTER_PAGE_INS,
    "page_outs_total": ADAPTER_PAGE_OUTS,
    "bytes_in_total": ADAPTER_PAGE_IN_BYTES,
}


class PoolMetrics:
    """Remembers the last snapshot so engine counters become increments of ours."""

    def __init__(self) -> None:
        self._last: dict[str, Any] = {}
        self._lock = asyncio.Lock()

    async def refresh(self, engine: EngineClient) -> None:
        """Read the engine's pool and apply it; concurrent calls take turns (see above)."""
        async with self._lock:
            snapshot = await engine.adapter_pool()
            self.update(snapshot)
            if snapshot is not None:  # paged mode: its scheduler measures residency waits
                self.observe_waits(await engine.residency_waits())

    def update(self, snapshot: Mapping[str, Any] | None) -> None:
        if snapshot is None:
            return  # vLLM's own slot buffers: nothing paged to report
        for group, pages in snapshot["group_pages"].items():
            ADAPTER_POOL_PAGES.labels(group, "used").set(pages["used"])
            ADAPTER_POOL_PAGES.labels(group, "free").set(pages["total"] - pages["used"])
        ADAPTERS_RESIDENT.labels(TIER).set(snapshot["adapters_resident"])
        # pages of different layer groups differ in size; the engine counts the bytes exactly
        ADAPTER_RESIDENT_BYTES.labels(TIER).set(snapshot["bytes_used"])
        for field, counter in _COUNTERS.items():
            counter.inc(self._delta(snapshot, field))
        evicted = self._delta(snapshot, "evictions_for_space_total")
        ADAPTER_EVICTIONS.labels(TIER, "capacity").inc(evicted)
        self._last = dict(snapshot)

    def observe_waits(self, waits: Iterable[float]) -> None:
        """Residency waits the engine measured since the last scrape (it hands each one
        over once)."""
        for wait in waits:
            ADAPTER_RESIDENCY_WAIT.observe(wait)

    def _delta(self, snapshot: Mapping[str, Any], field: str) -> int:
        value = snapshot[field]
        before = self._last.get(field, 0)
        # An engine restarted from zero: everything it counted since is new.
        return value if value < before else value - before
