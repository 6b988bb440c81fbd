from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path, Request

from gateway.admin_auth import AdminDep
from gateway.audit_log import registry_operation
from gateway.deps import DatasetAdminDep
from gateway.evals.suite import Suite
from gateway.schemas.admin_datasets import (
    ContaminationOut,
    DatasetLineageOut,
    DatasetRevokedOut,
    NgramFilterOut,
    RevokeDataset,
    TrainedOnOut,
)

router = APIRouter(prefix="/admin/v1/datasets", tags=["admin: datasets"])

Digest = Annotated[
    str,
    Path(
        description="The dataset's sha256 as its Adaptation Cards list it (`sha256:` optional).",
        examples=["sha256:" + "ab" * 32],
    ),
]


@router.get("/{sha256}/adapters")
async def dataset_lineage(sha256: Digest, _: AdminDep, admin: DatasetAdminDep) -> DatasetLineageOut:
    """Every adapter version whose card lists the dataset, in every state and tenant."""
    digest, trained = await admin.lineage(sha256)
    return DatasetLineageOut(dataset_sha256=digest, data=[TrainedOnOut.of(t) for t in trained])


@router.post("/{sha256}/revoke")
async def revoke_dataset(
    sha256: Digest, actor: AdminDep, admin: DatasetAdminDep, body: RevokeDataset | None = None
) -> DatasetRevokedOut:
    """Retire (or delete) every version trained on the dataset; `complete` is false while any
    was refused (a running canary: roll it back, then call again)."""
    body = body or RevokeDataset()
    async with registry_operation("revoke_dataset", actor, dataset=sha256, action=body.action):
        return await admin.revoke(sha256, body.action, body.reason, actor)


@router.put(
    "/{sha256}/ngram-filter",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {
                    "schema": {
                        "type": "string",
                        "format": "binary",
                        "example": "LORAPLEX-NGRAM-FILTER 1\n{...header...}\n<filter bytes>",
                    }
                }
            },
            "description": "The file `loraplex datasets build-filter DATASET` writes "
            "(at most LORAPLEX_NGRAM_FILTER_MAX_BYTES).",
        }
    },
)
async def register_ngram_filter(
    sha256: Digest, actor: AdminDep, admin: DatasetAdminDep, request: Request
) -> NgramFilterOut:
    """Register (or replace) the dataset's n-gram filter: what its texts hold, as hashes of
    every 8-word sequence, so eval suites can be checked against it (422 when it is malformed,
    was built from another dataset, or is too full: false-positive rate over 1 %)."""
    data = await request.body()
    async with registry_operation("register_ngram_filter", actor, dataset=sha256):
        return NgramFilterOut.of(await admin.register_ngram_filter(sha256, data, actor))


@router.get("/{sha256}/ngram-filter")
async def show_ngram_filter(sha256: Digest, _: AdminDep, admin: DatasetAdminDep) -> NgramFilterOut:
    """The dataset's registered n-gram filter (404 when none is)."""
    return NgramFilterOut.of(await admin.ngram_filter(sha256))


@router.delete("/{sha256}/ngram-filter")
async def delete_ngram_filter(
    sha256: Digest, actor: AdminDep, admin: DatasetAdminDep
) -> NgramFilterOut:
    """Forget the dataset's n-gram filter (its versions' suites are no longer checked against
    it); the answer describes the filter deleted."""
    async with registry_operation("delete_ngram_filter", actor, dataset=sha256):
        return NgramFilterOut.of(await admin.delete_ngram_filter(sha256, actor))


SUITE_EXAMPLE = {
    "name": "orders",
    "min_success": 1.0,
    "cases": [
        {
            "id": "refund-json",
            "prompt": "Summarise the refund policy for order seven in one sentence, as JSON",
            "checks": [{"type": "json"}],
        }
    ],
}


@router.post("/{sha256}/contamination")
async def check_contamination(
    sha256: Digest,
    suite: Annotated[Suite, Body(examples=[SUITE_EXAMPLE])],
    _: AdminDep,
    admin: DatasetAdminDep,
) -> ContaminationOut:
    """Check an eval suite against the dataset's n-gram filter: the cases whose input or
    reference answer it holds (>= 70 % of their 8-word sequences), as `evaluate --report`
    does for each dataset a version's card lists (404 when no filter is registered)."""
    return ContaminationOut.of(await admin.check_suite(sha256, suite), suite)
