"""Fault injection (mounted only with LORAPLEX_ENABLE_FAULTS=1): for tests and game days."""

from __future__ import annotations

from fastapi import APIRouter, Request

from gateway.admin_auth import AdminDep
from gateway.audit_log import audit_event
from gateway.faults import Fault, FaultInjector
from gateway.schemas.admin import FaultIn, FaultsOut

router = APIRouter(prefix="/admin/v1/faults", tags=["admin: fault injection"])


def _injector(request: Request) -> FaultInjector:
    injector: FaultInjector = request.app.state.faults
    return injector


def _listing(injector: FaultInjector) -> FaultsOut:
    return FaultsOut(
        faults=[
            {"adapter": a, "version": v, "latency_ms": f.latency_ms, "error_rate": f.error_rate}
            for (a, v), f in sorted(injector.active().items())
        ]
    )


@router.get("")
async def list_faults(request: Request, actor: AdminDep) -> FaultsOut:
    """Faults in force."""
    return _listing(_injector(request))


@router.post("")
async def set_fault(body: FaultIn, request: Request, actor: AdminDep) -> FaultsOut:
    """Delay and/or fail requests served by one adapter version."""
    injector = _injector(request)
    injector.set(body.adapter, body.version, Fault(body.latency_ms, body.error_rate))
    audit_event("admin.fault_set", actor=actor, adapter=body.adapter, version=body.version)
    return _listing(injector)


@router.delete("")
async def clear_faults(
    request: Request, actor: AdminDep, adapter: str | None = None, version: int | None = None
) -> FaultsOut:
    """Remove faults: all, one adapter's, or one version's."""
    injector = _injector(request)
    injector.clear(adapter, version)
    audit_event("admin.fault_clear", actor=actor, adapter=adapter, version=version)
    return _listing(injector)
