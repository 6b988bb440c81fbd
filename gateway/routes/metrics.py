from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

router = APIRouter(tags=["observability"])


@router.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    """Prometheus exposition: the embedded vLLM engine's own `vllm:*` metrics (same process)."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
