"""Dependency aliases: singletons created in the app's lifespan, reached through these.

The getters are `async def` although they do not await: FastAPI runs a plain `def`
dependency in its thread pool, a thread hop per dependency per request. On a cold burst of
16 completions that hop (new pool threads, GIL hand-offs) made up most of the 330 ms the
gateway took; as coroutines they run inline on the event loop.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from gateway.catalog import ModelCatalog
from gateway.engine.client import EngineClient
from gateway.errors import EngineUnavailable
from gateway.registry_runtime import RegistryRuntime
from gateway.services.adapter_admin import AdapterAdmin
from gateway.services.dataset_admin import DatasetAdmin
from gateway.services.eval_evidence import EvalEvidence
from gateway.services.generation import GenerationService
from gateway.services.rollout_admin import RolloutAdmin
from gateway.services.tenant_admin import TenantAdmin


def _state(request: Request, name: str):  # type: ignore[no-untyped-def]
    value = getattr(request.app.state, name, None)
    if value is None:
        raise EngineUnavailable("The gateway is starting; try again shortly.")
    return value


async def get_service(request: Request) -> GenerationService:
    service: GenerationService = _state(request, "generation")
    return service


async def get_engine(request: Request) -> EngineClient:
    engine: EngineClient = _state(request, "engine")
    return engine


async def get_catalog(request: Request) -> ModelCatalog:
    catalog: ModelCatalog = _state(request, "catalog")
    return catalog


async def get_registry(request: Request) -> RegistryRuntime:
    registry: RegistryRuntime = _state(request, "registry")
    return registry


async def get_adapter_admin(request: Request) -> AdapterAdmin:
    admin: AdapterAdmin = _state(request, "adapter_admin")
    return admin


async def get_dataset_admin(request: Request) -> DatasetAdmin:
    admin: DatasetAdmin = _state(request, "dataset_admin")
    return admin


async def get_tenant_admin(request: Request) -> TenantAdmin:
    admin: TenantAdmin = _state(request, "tenant_admin")
    return admin


async def get_eval_evidence(request: Request) -> EvalEvidence:
    evidence: EvalEvidence = _state(request, "eval_evidence")
    return evidence


async def get_rollout_admin(request: Request) -> RolloutAdmin:
    admin: RolloutAdmin = _state(request, "rollout_admin")
    return admin


ServiceDep = Annotated[GenerationService, Depends(get_service)]
EngineDep = Annotated[EngineClient, Depends(get_engine)]
CatalogDep = Annotated[ModelCatalog, Depends(get_catalog)]
RegistryDep = Annotated[RegistryRuntime, Depends(get_registry)]
AdapterAdminDep = Annotated[AdapterAdmin, Depends(get_adapter_admin)]
DatasetAdminDep = Annotated[DatasetAdmin, Depends(get_dataset_admin)]
TenantAdminDep = Annotated[TenantAdmin, Depends(get_tenant_admin)]
RolloutAdminDep = Annotated[RolloutAdmin, Depends(get_rollout_admin)]
EvalEvidenceDep = Annotated[EvalEvidence, Depends(get_eval_evidence)]
