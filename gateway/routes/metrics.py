from __future__ import annotations

import os
from collections.abc import Iterator

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from gateway.admin_auth import MetricsReaderDep
from gateway.metrics import ENGINE_UP
from gateway.pool_metrics import PoolMetrics

router = APIRouter(tags=["observability"])

# Families of the embedded engine left out of /metrics. vllm:lora_requests_info labels a
# series with the comma-joined sets of running and waiting adapters: one more series for every
# combination ever scheduled, never removed (unbounded cardinality). loraplex_requests_in_flight,
# loraplex_adapters_resident and vllm:num_requests_* say the same with bounded labels.
DROPPED_FAMILIES = frozenset({"vllm:lora_requests_info"})


def _registry() -> CollectorRegistry:
    """This process's metrics, or every worker's when PROMETHEUS_MULTIPROC_DIR is set (several
    uvicorn workers, each with its own values, aggregated here per gauge mode)."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return REGISTRY
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


class Exposed:
    """What /metrics shows of `source`: every family but DROPPED_FAMILIES."""

    def __init__(self, source: Collector):
        self._source = source

    def collect(self) -> Iterator[Metric]:
        return (family for family in self._source.collect() if family.name not in DROPPED_FAMILIES)


def _forget_dropped() -> None:
    """The engine's own collectors still keep a child per label set they were given: emptied at
    each scrape, so the process holds only what arrived since the last one."""
    for name in DROPPED_FAMILIES:
        collector = REGISTRY._names_to_collectors.get(name)
        clear = getattr(collector, "clear", None)
        if clear is not None:
            clear()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, reader: MetricsReaderDep) -> Response:
    """Prometheus exposition: loraplex_* per tenant/adapter/version, and the embedded vLLM
    engine's own vllm:* metrics (same process). Needs the metrics (or admin) token: the
    series name every tenant's adapters."""
    engine = getattr(request.app.state, "engine", None)
    # Probed at scrape time, so "engine down" alerts fire even when no traffic arrives.
    alive = engine is not None and (await engine.health()).alive
    ENGINE_UP.set(1 if alive else 0)
    if engine is not None and alive:
        pool = getattr(request.app.state, "pool_metrics", None)
        if pool is None:
            pool = request.app.state.pool_metrics = PoolMetrics()
        await pool.refresh(engine)
    drift = getattr(request.app.state, "prompt_drift", None)
    if drift is not None:
        drift.refresh()  # windows slide with the clock, samples or not
    body = generate_latest(Exposed(_registry()))
    _forget_dropped()
    return Response(body, media_type=CONTENT_TYPE_LATEST)
