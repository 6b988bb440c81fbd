"""Typed registry errors. No HTTP here: the gateway maps each class to a status and an error body.

Suggested mapping for the gateway: AdapterRejected / InvalidName / InvalidInput (InvalidPolicy,
InvalidRollbackPath, InvalidThresholds) → 422, *NotFound (ApiKeyNotFound too) → 404,
Duplicate* / RegistryConflict / InvalidStateTransition / RollbackRefused → 409, UploadTooLarge →
413, UnsafeArchive → 400, PathNotAllowed → 403, InvalidApiKey → 401 with the same body whatever
its `reason`, BaseModelMismatch → refuse start.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from registry.compat.problems import Problem


class RegistryError(Exception):
    """Base class; `code` is a stable machine-readable string for API error bodies."""

    code = "registry_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class AdapterRejected(RegistryError):
    """Registration refused; `problems` lists every reason found, not only the first."""

    code = "adapter_rejected"

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        reasons = "; ".join(f"[{p.code}] {p.message}" for p in self.problems)
        super().__init__(f"adapter rejected: {reasons}")


class BaseModelMismatch(RegistryError):
    """The served base differs from the one registered under the same name: refuse to start."""

    code = "base_model_mismatch"

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__("; ".join(p.message for p in self.problems))


class InvalidName(RegistryError):
    code = "invalid_name"


class InvalidInput(RegistryError):
    """An admin request that is well-formed but not acceptable (e.g. an expiry in the past)."""

    code = "invalid_input"


class PartnerOnlyData(InvalidInput):
    """Sharing an adapter that serves a version trained on PARTNER_ONLY data."""

    code = "license_partner_only"


class InvalidPolicy(InvalidInput):
    """A tenant policy was refused; `problems` lists every reason found, not only the first."""

    code = "invalid_policy"

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        super().__init__("invalid tenant policy: " + "; ".join(self.problems))


class InvalidRollbackPath(InvalidInput):
    """An admin-set rollback path was refused; `problems` says why (ROLLBACK_PATH_INVALID)."""

    code = "invalid_rollback_path"

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__("; ".join(p.message for p in self.problems))


class InvalidThresholds(InvalidInput):
    """A rollback-threshold override was refused; `problems` lists every reason."""

    code = "invalid_thresholds"

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        super().__init__("invalid rollback thresholds: " + "; ".join(self.problems))


class RollbackRefused(RegistryError):
    """A stable version's traffic could not be moved to its rollback target (missing, foreign,
    cyclic, itself failing). The stable keeps serving; an operator must choose another target."""

    code = "rollback_refused"

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__("rollback refused: " + "; ".join(p.message for p in self.problems))


class InvalidApiKey(RegistryError):
    """Authentication failed. The message is the same whatever went wrong, so a caller cannot
    tell a revoked key from a typo; `reason` ("malformed", "unknown", "revoked", "expired") and
    `key_id` (the presented key's public id, None when malformed) are for logs and metrics only.
    A wrong secret for an existing key id reads "unknown"."""

    code = "invalid_api_key"
    REASONS = frozenset({"malformed", "unknown", "revoked", "expired"})

    def __init__(self, reason: str, *, key_id: str | None = None) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown InvalidApiKey reason {reason!r}")
        self.reason = reason
        self.key_id = key_id
        super().__init__("Incorrect API key provided.")


class InvalidStateTransition(RegistryError):
    code = "invalid_state_transition"


class RegistryConflict(RegistryError):
    """A concurrent writer won a race (unique constraint); the caller may retry."""

    code = "conflict"


class NotFound(RegistryError):
    code = "not_found"


class AdapterNotFound(NotFound):
    """Unknown, foreign-private or unservable adapter: one answer so names cannot be probed."""

    code = "adapter_not_found"


class VersionNotFound(NotFound):
    code = "version_not_found"


class TenantNotFound(NotFound):
    code = "tenant_not_found"


class ApiKeyNotFound(NotFound):
    code = "api_key_not_found"


class BaseModelNotFound(NotFound):
    code = "base_model_not_found"


class ArtifactNotFound(NotFound):
    code = "artifact_not_found"


class Duplicate(RegistryError):
    code = "duplicate"


class DuplicateAdapter(Duplicate):
    code = "duplicate_adapter"


class DuplicateTenant(Duplicate):
    code = "duplicate_tenant"


class DuplicateBaseModel(Duplicate):
    code = "duplicate_base_model"


class IngestError(RegistryError):
    """Base for upload/staging failures: the input never reached the store."""

    code = "ingest_error"


class UploadTooLarge(IngestError):
    code = "upload_too_large"

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"upload exceeds the limit of {limit} bytes")


class UnsafeArchive(IngestError):
    code = "unsafe_archive"


class PathNotAllowed(IngestError):
    code = "path_not_allowed"


class ArtifactError(RegistryError):
    """The store failed or returned bytes whose digest differs from what was inspected."""

    code = "artifact_error"


class BaseModelError(RegistryError):
    """A base checkpoint directory could not be fingerprinted (missing files, bad config)."""

    code = "base_model_error"
