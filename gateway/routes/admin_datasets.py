from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from gateway.admin_auth import AdminDep
from gateway.audit_log import registry_operation
from gateway.deps import DatasetAdminDep
from gateway.schemas.admin_datasets import (
    DatasetLineageOut,
    DatasetRevokedOut,
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
