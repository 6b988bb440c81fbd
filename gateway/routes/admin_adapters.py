from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Path, Query, Request, UploadFile

from gateway.admin_auth import AdminDep
from gateway.audit_log import registry_operation
from gateway.deps import AdapterAdminDep, RegistryDep, get_eval_evidence
from gateway.schemas.admin import (
    AdapterOut,
    ChangeReason,
    EvaluateVersion,
    ImportAdapter,
    VersionOut,
)
from gateway.schemas.admin_weights import (
    DerivedOut,
    DerivedVersionOut,
    ModuleSpectrumOut,
    SpectrumOut,
    StackAdapter,
    TruncateVersion,
)
from gateway.services.eval_evidence import ReportRequired
from registry import service
from registry.rank_spectrum import rank_needed, rank_warnings

router = APIRouter(prefix="/admin/v1/adapters", tags=["admin: adapters"])
# Bounded so a number past the database's integer is a 400, not an overflow in the query.
VersionNumber = Annotated[int, Path(ge=1, le=2**31 - 1)]


@router.post("", status_code=201)
async def register_adapter_upload(
    actor: AdminDep,
    admin: AdapterAdminDep,
    name: Annotated[str, Form(examples=["support-bot"])],
    tenant: Annotated[
        str,
        Form(
            examples=["acme"],
            description="The owning tenant; required (a default owner gave customers' private "
            "adapters to whoever held that tenant's keys).",
        ),
    ],
    files: Annotated[
        list[UploadFile],
        File(description="adapter_config.json + adapter_model.safetensors, or one .tar/.zip"),
    ],
    visibility: Annotated[
        Literal["private", "shared"] | None,
        Form(description="A new adapter's (default private); omitted, a new version keeps it."),
    ] = None,
    card: Annotated[str | None, Form(description="Adaptation Card JSON")] = None,
    base_sha256: Annotated[str | None, Form()] = None,
) -> VersionOut:
    """Register a new immutable adapter version by upload; every gate refusal is listed (422)."""
    row = await admin.register_upload(
        files,
        name=name,
        tenant=tenant,
        visibility=visibility,
        card=card,
        base_sha256=base_sha256,
        actor=actor,
    )
    return VersionOut.of(row)


@router.post("/import", status_code=201)
async def register_adapter_path(
    body: ImportAdapter, actor: AdminDep, admin: AdapterAdminDep
) -> VersionOut:
    """Register a new version from a local folder under an allow-listed root."""
    row = await admin.register_path(
        body.path,
        name=body.name,
        tenant=body.tenant,
        visibility=body.visibility,
        card=body.card,
        base_sha256=body.base_sha256,
        actor=actor,
    )
    return VersionOut.of(row)


@router.post("/stack", status_code=201)
async def register_stack(body: StackAdapter, actor: AdminDep, admin: AdapterAdminDep) -> VersionOut:
    """Register a version that serves several adapters together (their ranks side by side,
    exact): each component's card must allow the others; every refusal is listed (422)."""
    row = await admin.register_stack(
        [(c.adapter, c.weight) for c in body.components],
        name=body.name,
        tenant=body.tenant,
        visibility=body.visibility,
        description=body.description,
        rollback_path=body.rollback_path,
        actor=actor,
    )
    return VersionOut.of(row)


@router.get("")
async def list_adapters(
    actor: AdminDep, registry: RegistryDep, tenant: str | None = None
) -> list[AdapterOut]:
    """List adapters, optionally those a tenant owns or may use (shared)."""
    async with registry.sessions() as session:
        if tenant is not None:
            await service.get_tenant(session, name=tenant)  # unknown tenant → 404, as for keys
        rows = await service.list_adapters(session, tenant=tenant)
    return [AdapterOut.of(row) for row in rows]


@router.get("/{name}")
async def get_adapter(name: str, actor: AdminDep, registry: RegistryDep) -> AdapterOut:
    """One adapter with all its versions (deleted ones included, as tombstones)."""
    async with registry.sessions() as session:
        row = await service.get_adapter(session, name=name)
        versions = await service.list_versions(session, name=name)
    return AdapterOut.of(row, versions)


@router.post("/{name}/versions/{version}/evaluate")
async def evaluate_version(
    name: str,
    version: VersionNumber,
    actor: AdminDep,
    registry: RegistryDep,
    request: Request,
    body: EvaluateVersion | None = None,
) -> VersionOut:
    """Record that a version passed its evaluation (compatible → evaluated): a canary can start.
    With `report` (from `loraplex eval run`), the gateway checks its response ids and judges its
    gates again first (422 `eval_gate_failed` / `eval_evidence_invalid`, every problem listed);
    with LORAPLEX_EVALUATE_REQUIRES_REPORT a report is required (422 `eval_report_required`)."""
    reason = body.reason if body else None
    report = body.report if body else None
    settings = request.app.state.settings
    if report is None and (
        settings.evaluate_requires_report or settings.evaluate_requires_ngram_filters
    ):
        raise ReportRequired()
    async with registry_operation("evaluate", actor, adapter=name, version=version):
        if report is not None:
            evidence = await get_eval_evidence(request)
            row = await evidence.mark_evaluated(
                name=name, version=version, actor=actor, reason=reason, report=report
            )
        else:
            async with registry.sessions() as session:
                row = await service.mark_evaluated(
                    session, name=name, version=version, actor=actor, reason=reason
                )
    return VersionOut.of(row)


@router.get("/{name}/versions/{version}/spectrum")
async def version_spectrum(
    name: str,
    version: VersionNumber,
    actor: AdminDep,
    admin: AdapterAdminDep,
    energy: Annotated[float, Query(gt=0, le=1, allow_inf_nan=False)] = 0.95,
) -> SpectrumOut:
    """How much of its rank a version uses: each module's singular values and the rank that
    keeps `energy` of its delta (seed: the SVD rank diagnostic at 95 %)."""
    row, modules = await admin.spectrum(name, version)
    needed = rank_needed(modules, energy)
    return SpectrumOut(
        name=name,
        version=version,
        rank=row.rank,
        energy=energy,
        rank_needed=needed,
        warnings=rank_warnings(row.rank, needed, energy),
        modules=[
            ModuleSpectrumOut(
                module=m.path,
                rank_needed=m.rank_for(energy),
                singular_values=list(m.singular_values),
            )
            for m in modules
        ],
    )


@router.get("/{name}/versions/{version}/derived")
async def derived_versions(
    name: str, version: VersionNumber, actor: AdminDep, registry: RegistryDep
) -> DerivedOut:
    """Versions made from this version's weights (stacks holding it, its truncations), in any
    tenant and state: retiring it leaves them serving."""
    async with registry.sessions() as session:
        await service.get_version(session, name=name, version=version)  # unknown: 404
        found = await service.versions_derived_from(session, name=name, version=version)
    return DerivedOut(
        adapter=name,
        version=version,
        data=[
            DerivedVersionOut(
                adapter=d.adapter,
                tenant=d.tenant,
                version=d.version,
                state=d.state.value,
                how="stack" if d.how == "stack" else "truncation",
            )
            for d in found
        ],
    )


@router.post("/{name}/versions/{version}/truncate", status_code=201)
async def truncate_version(
    name: str,
    version: VersionNumber,
    body: TruncateVersion,
    actor: AdminDep,
    admin: AdapterAdminDep,
) -> VersionOut:
    """Register a new version with every module cut to its best rank-k approximation (a new
    version: it reaches the name through a canary, like any)."""
    row = await admin.truncate(
        name, version, rank=body.rank, energy=body.energy, reason=body.reason, actor=actor
    )
    return VersionOut.of(row)


@router.post("/{name}/versions/{version}/retire")
async def retire_version(
    name: str,
    version: VersionNumber,
    actor: AdminDep,
    admin: AdapterAdminDep,
    body: ChangeReason | None = None,
) -> VersionOut:
    """Stop serving a version; it stays in the registry for audit."""
    row = await admin.retire(name, version, body.reason if body else None, actor)
    return VersionOut.of(row)


@router.delete("/{name}/versions/{version}")
async def delete_version(
    name: str,
    version: VersionNumber,
    actor: AdminDep,
    admin: AdapterAdminDep,
    reason: str | None = None,
) -> VersionOut:
    """Tombstone a version and delete its artifact when no other version uses it."""
    row = await admin.delete(name, version, reason, actor)
    return VersionOut.of(row)
