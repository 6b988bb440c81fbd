"""Admin API payloads for dataset lineage: which adapter versions a dataset went into, and
taking them all out of service when the dataset is withdrawn."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from gateway.schemas.admin import Payload, Strict, example
from registry.service import TrainedOn

TRAINED_ON_EXAMPLE = {
    "adapter": "support-bot",
    "tenant": "acme",
    "version": 3,
    "state": "production",
    "visibility": "private",
    "dataset_name": "partner-tickets",
    "dataset_license": "PARTNER_ONLY",
}


class TrainedOnOut(Strict):
    adapter: str
    tenant: str
    version: int
    state: str
    visibility: str
    dataset_name: str
    dataset_license: str | None

    model_config = example(TRAINED_ON_EXAMPLE)

    @classmethod
    def of(cls, row: TrainedOn) -> TrainedOnOut:
        return cls(
            adapter=row.adapter,
            tenant=row.tenant,
            version=row.version,
            state=row.state.value,
            visibility=row.visibility.value,
            dataset_name=row.dataset_name,
            dataset_license=row.dataset_license,
        )


class DatasetLineageOut(Strict):
    object: Literal["list"] = "list"
    dataset_sha256: str
    data: list[TrainedOnOut]


class RevokeDataset(Payload):
    action: Annotated[
        Literal["retire", "delete"],
        Field(
            description="retire: stop serving every version (kept for audit); delete: also "
            "tombstone them and delete artifacts no other version uses."
        ),
    ] = "retire"
    reason: Annotated[str | None, Field(max_length=300)] = None

    model_config = example({"action": "retire", "reason": "partner contract ended"})


class RevokedVersionOut(Strict):
    adapter: str
    tenant: str
    version: int
    state: str  # after the revocation
    # retired / deleted (by this call), already_retired / already_deleted, refused (`reason`
    # says why: a running canary must be rolled back first, say), failed (this version's own
    # error, or the registry's), or skipped (not tried after the registry failed).
    outcome: Literal[
        "retired", "deleted", "already_retired", "already_deleted", "refused", "failed", "skipped"
    ]
    reason: str | None = None


class DatasetRevokedOut(Strict):
    object: Literal["dataset_revocation"] = "dataset_revocation"
    dataset_sha256: str
    action: Literal["retire", "delete"]
    # False while any version is still in service (refused, failed or skipped): fix what
    # `reason` says, then revoke again (versions already out of service are left as they are).
    complete: bool
    versions: list[RevokedVersionOut]

    model_config = example(
        {
            "object": "dataset_revocation",
            "dataset_sha256": "ab" * 32,
            "action": "retire",
            "complete": True,
            "versions": [
                {
                    "adapter": "support-bot",
                    "tenant": "acme",
                    "version": 3,
                    "state": "retired",
                    "outcome": "retired",
                    "reason": None,
                }
            ],
        }
    )
