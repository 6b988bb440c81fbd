from __future__ import annotations

import os

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from gateway.admin_auth import MetricsReaderDep
from gateway.metrics import ENGINE_UP
from gateway.pool_metrics import PoolMetrics

router = APIRouter(tags=["observability"])


def _registry() -> CollectorRegistry:
    """This process's metrics, or every worker's when PROMETHEUS_MULTIPROC_DIR is set (several
    uvicorn workers, each with its own values, aggregated here per gauge mode)."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return REGISTRY
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


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
        snapshot = await engine.adapter_pool()
        pool.update(snapshot)
        if snapshot is not None:  # paged mode: its scheduler measures residency waits
            pool.observe_waits(await engine.residency_waits())
    return Response(generate_latest(_registry()), media_type=CONTENT_TYPE_LATEST)
