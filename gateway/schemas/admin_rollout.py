"""Admin API payloads of rollouts, shadows, rollback paths and thresholds (strict, like every
admin payload)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from gateway.schemas.admin import Payload, Strict, example


class StartRollout(Payload):
    version: int = Field(gt=0)
    percent: Literal[1, 10, 50] = Field(1, description="Starting stage; 100 % is a promotion.")
    force: bool = Field(False, description="Restart a version that was rolled back before.")
    reason: str | None = Field(None, max_length=500)

    model_config = example({"version": 3, "percent": 10, "reason": "eval passed"})


class StartShadow(Payload):
    version: int = Field(gt=0, description="An evaluated version newer than the stable.")
    percent: int = Field(
        ge=1, le=100, description="Share of the stable's callers whose requests are mirrored."
    )
    reason: str | None = Field(None, max_length=500)

    model_config = example({"version": 3, "percent": 10, "reason": "eval passed"})


class PromoteRollout(Payload):
    to_percent: Literal[10, 50, 100] | None = Field(None, description="Default: the next stage.")

    model_config = example({"to_percent": 50})


class RollbackPath(Payload):
    target: str | None = Field(
        None,
        description='"base", "name" or "name@N" of an adapter the tenant may use; null clears.',
    )

    model_config = example({"target": "support-bot@2"})


class RolloutOut(Strict):
    name: str
    stable_version: int | None
    canary_version: int | None
    canary_percent: int
    shadow_version: int | None = Field(
        description="The candidate mirrored a copy of the stable's requests (output discarded)."
    )
    shadow_percent: int = Field(description="Share of the stable's callers mirrored (0: none).")
    paused: bool
    stage: str | None
    rollback_target: str
    active_target: str | None
    auto_fallback: bool = Field(
        description="Whether a breaching stable moves to rollback_target without an operator "
        "(armed by an admin-set rollback path or by the stable's card)."
    )
    rolled_back_version: int | None
    rolled_back_at: datetime | None
    updated_at: datetime | None
    threshold_override: dict[str, Any] | None
    events: list[dict[str, Any]] | None = None
    windows: dict[str, dict[str, Any]] | None = Field(
        None,
        description="Status only: this replica's sliding windows of the stable, canary and "
        "shadow versions (samples, p95_ttft_ms, p95_e2e_ms, error_rate).",
    )

    model_config = example(
        {
            "name": "support-bot",
            "stable_version": 2,
            "canary_version": 3,
            "canary_percent": 10,
            "shadow_version": None,
            "shadow_percent": 0,
            "paused": False,
            "stage": "canary",
            "rollback_target": "support-bot@1",
            "active_target": None,
            "auto_fallback": True,
            "rolled_back_version": None,
            "rolled_back_at": None,
            "updated_at": "2026-11-24T10:00:00Z",
            "threshold_override": {"sla_p95_e2e_ms": 800},
            "events": None,
            "windows": {
                "support-bot@2": {
                    "samples": 100,
                    "p95_ttft_ms": 41.0,
                    "p95_e2e_ms": 380.5,
                    "error_rate": 0.0,
                }
            },
        }
    )


class ThresholdsOverride(Payload):
    """Rollback thresholds for one adapter; omitted fields fall back to the card, then the
    gateway defaults (window 100, error rate 0.1 %, margin 15 ms)."""

    window: int | None = Field(None, gt=0)
    max_error_rate: float | None = Field(None, ge=0, lt=1)
    sla_p95_ttft_ms: float | None = Field(None, gt=0)
    sla_p95_e2e_ms: float | None = Field(None, gt=0)
    margin_ms: float | None = Field(None, ge=0)
    max_p95_ttft_ms: float | None = Field(None, gt=0)
    max_p95_e2e_ms: float | None = Field(None, gt=0)
    min_task_success: float | None = Field(None, ge=0, le=1)
    min_tool_call_validity: float | None = Field(None, ge=0, le=1)

    model_config = example({"sla_p95_e2e_ms": 800, "margin_ms": 15, "max_error_rate": 0.001})
