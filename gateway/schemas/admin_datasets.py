"""Admin API payloads for dataset lineage: which adapter versions a dataset went into, and
taking them all out of service when the dataset is withdrawn; datasets' n-gram filters and eval
suites checked against them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field

from gateway.evals.contamination import Contamination
from gateway.evals.suite import Suite
from gateway.schemas.admin import Payload, Strict, example
from registry.models import DatasetNgramFilter
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


class NgramFilterOut(Strict):
    """A dataset's registered n-gram filter (its bits are not shown)."""

    object: Literal["ngram_filter"] = "ngram_filter"
    dataset_sha256: str
    ngram_words: int
    hash_count: int
    bit_count: int
    # Measured from the filter's bits when it was registered.
    false_positive_rate: float
    # The builder's report of the dataset file.
    ngrams: int
    texts: int
    lines: int
    dataset_bytes: int
    registered_at: datetime
    registered_by: str

    model_config = example(
        {
            "object": "ngram_filter",
            "dataset_sha256": "ab" * 32,
            "ngram_words": 8,
            "hash_count": 10,
            "bit_count": 24729456,
            "false_positive_rate": 0.001,
            "ngrams": 1720000,
            "texts": 40000,
            "lines": 20000,
            "dataset_bytes": 12175430,
            "registered_at": "2026-12-07T23:00:00Z",
            "registered_by": "admin",
        }
    )

    @classmethod
    def of(cls, row: DatasetNgramFilter) -> NgramFilterOut:
        return cls(
            dataset_sha256=row.dataset_sha256,
            ngram_words=row.ngram_words,
            hash_count=row.hash_count,
            bit_count=row.bit_count,
            false_positive_rate=row.false_positive_rate,
            ngrams=row.ngrams,
            texts=row.texts,
            lines=row.lines,
            dataset_bytes=row.dataset_bytes,
            registered_at=row.registered_at,
            registered_by=row.registered_by,
        )


class PartOverlapOut(Strict):
    item: str  # "<case id>:input" or "<case id>:answer"
    ngrams: int
    held: int
    contaminated: bool


class ContaminationOut(Strict):
    """An eval suite checked against one dataset's filter: the cases it holds (>= 70 % of the
    8-word sequences of their input or reference answer), those too short to judge, and every
    part with any sequence found."""

    object: Literal["contamination_check"] = "contamination_check"
    dataset_sha256: str
    suite: str
    cases: int
    false_positive_rate: float
    contaminated: list[str]
    unjudged: list[str]
    found: list[PartOverlapOut]

    model_config = example(
        {
            "object": "contamination_check",
            "dataset_sha256": "ab" * 32,
            "suite": "orders",
            "cases": 2,
            "false_positive_rate": 0.001,
            "contaminated": ["refund-json"],
            "unjudged": [],
            "found": [
                {"item": "refund-json:input", "ngrams": 12, "held": 12, "contaminated": True}
            ],
        }
    )

    @classmethod
    def of(cls, check: Contamination, suite: Suite) -> ContaminationOut:
        return cls(
            dataset_sha256=check.dataset_sha256,
            suite=suite.name,
            cases=len(suite.cases),
            false_positive_rate=check.false_positive_rate,
            contaminated=check.contaminated_cases,
            unjudged=check.unjudged_cases,
            found=[
                PartOverlapOut(
                    item=part.item,
                    ngrams=part.ngrams,
                    held=part.held,
                    contaminated=part.contaminated,
                )
                for part in check.parts
                if part.held
            ],
        )
