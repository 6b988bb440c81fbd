"""Canary rollouts, the pure part: the stage ladder, sticky caller assignment, what a gateway
replica needs to route one adapter's traffic (`RolloutView`), and which rollback thresholds
judge a version (`effective_thresholds`). No I/O; registry.service.rollout writes the state.

Seed rules: a canary takes 1 % → 10 % → 50 % → 100 % of an adapter's traffic; a version is
rolled back when its p95 latency exceeds the SLA (plus a margin, or an absolute bound) or its
error rate exceeds 0.1 % over a 100-request window. A canary rolls back to the stable version; a
stable version that breaches sends its traffic to its rollback path (an earlier version, another
adapter the same tenant may use, or the base model) until an operator restores it.

Routing a request for adapter `name` (what `RolloutView.route` does):
1. a running canary (paused or not: pausing only freezes the stage) takes the callers that
   `assign` puts in it;
2. everyone else gets the stable version, or `active_target` while the stable is in fallback.
An explicit `name@N` bypasses all of this (admins, tests, pinned clients).

Shadow (seed step 8): while a shadow runs, a request the stable served for a caller that
`in_shadow` puts in its share is also sent to `name@<shadow>` after the client's answer is
complete; the candidate's output is only compared, never shown (`shadow_route`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from registry.errors import InvalidThresholds
from registry.states import VersionState

STAGES: tuple[int, ...] = (1, 10, 50, 100)
# The version state that goes with each canary share; 100 % completes the rollout.
STAGE_STATES: dict[int, VersionState] = {
    1: VersionState.CANARY_1,
    10: VersionState.CANARY_10,
    50: VersionState.CANARY_50,
    100: VersionState.PRODUCTION,
}
BUCKETS = 10_000  # 0.01 % resolution: every stage is a whole number of buckets


def next_stage(percent: int) -> int:
    """The stage after `percent` (1 → 10 → 50 → 100). ValueError at 100 or off the ladder."""
    if percent not in STAGES:
        raise ValueError(f"{percent} % is not a rollout stage {STAGES}")
    if percent == STAGES[-1]:
        raise ValueError("100 % is the last stage")
    return STAGES[STAGES.index(percent) + 1]


def bucket(caller_key: str, adapter: str) -> int:
    """The caller's fixed bucket in 0..9999 for this adapter: the first 8 bytes of
    sha256(adapter + "\\0" + caller_key), big-endian, mod 10 000 (bias below 1e-15)."""
    digest = hashlib.sha256(f"{adapter}\0{caller_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def shadow_bucket_key(adapter: str) -> str:
    """The namespace `in_shadow` hashes callers in: adapter names never contain NUL, so this
    is no other adapter's canary namespace, and the shadow's share is independent of the
    canary's (the same callers are not both in the 1 % canary and the 1 % shadow)."""
    return f"{adapter}\0shadow"


def assign(caller_key: str, adapter: str, percent: int) -> bool:
    """Whether the caller is in the canary of `adapter` at `percent` %.

    Deterministic (every replica agrees without talking), sticky (a caller keeps its answer for
    as long as the stage does) and monotone (in at 10 % → in at 50 %: the canary's audience only
    grows, so nobody flips back and forth between versions while a rollout advances). Hashing
    the adapter name too makes adapters independent: the same 1 % of callers is not the canary
    of every adapter at once. The gateway chooses the key (API key id, plus the request's `user`
    when given); one key per end user spreads a tenant over both versions.
    """
    if not 0 <= percent <= 100:
        raise ValueError(f"percent must be in 0..100, not {percent}")
    return bucket(caller_key, adapter) < percent * (BUCKETS // 100)


# ------------------------------------------------------------------------------ thresholds


@dataclass(frozen=True)
class Thresholds:
    """When a version's window breaches. Field names match the gateway's
    `rollback_monitor.WindowLimits`, so `WindowLimits(**dataclasses.asdict(t))` converts."""

    window: int = 100
    max_error_rate: float = 0.001
    sla_p95_ttft_ms: float | None = None
    sla_p95_e2e_ms: float | None = None
    margin_ms: float = 15.0  # a breach is p95 > SLA + margin
    max_p95_ttft_ms: float | None = None  # absolute bounds, SLA or not
    max_p95_e2e_ms: float | None = None
    # The lowest share of `success` among the last `window` success/failure feedback verdicts
    # (POST /v1/feedback); None: feedback never rolls back.
    min_task_success: float | None = 0.9
    # The lowest share of valid calls (a given function, arguments matching its parameters)
    # among the last `window` tool calls the version wrote under tool_choice "auto"; None:
    # tool calls never roll back.
    min_tool_call_validity: float | None = 0.95


THRESHOLD_FIELDS = tuple(f.name for f in fields(Thresholds))


class _Override(BaseModel):
    """An admin's per-adapter override: only the keys given apply; an explicit null removes an
    SLA or bound that the card sets. Ranges as in the card (registry.card.RollbackTriggers)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)

    window: int = Field(100, ge=10, le=100_000)
    max_error_rate: float = Field(0.001, ge=0, lt=1)
    sla_p95_ttft_ms: float | None = Field(None, gt=0, le=600_000)
    sla_p95_e2e_ms: float | None = Field(None, gt=0, le=3_600_000)
    margin_ms: float = Field(15.0, ge=0, le=600_000)
    max_p95_ttft_ms: float | None = Field(None, gt=0, le=600_000)
    max_p95_e2e_ms: float | None = Field(None, gt=0, le=3_600_000)
    min_task_success: float | None = Field(None, ge=0, le=1)
    min_tool_call_validity: float | None = Field(None, ge=0, le=1)


def validate_threshold_override(data: Mapping[str, Any]) -> dict[str, Any]:
    """The override as stored (only the keys given, numbers as JSON numbers). Raises
    InvalidThresholds listing every problem."""
    if not isinstance(data, Mapping):
        raise InvalidThresholds(["thresholds must be a JSON object"])
    try:
        # Strict: "5" or true is refused, 5 is fine for a float field (JSON has one number type).
        parsed = _Override.model_validate(dict(data))
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in e['loc']) or 'thresholds'}: {e['msg']}"
            for e in exc.errors(include_url=False)
        ]
        raise InvalidThresholds(problems) from None
    return parsed.model_dump(mode="json", exclude_unset=True)


# Where each threshold lives in an Adaptation Card (registry.card: ServingSLA, RollbackTriggers).
_CARD_PATHS: dict[str, tuple[str, str]] = {
    "sla_p95_ttft_ms": ("sla", "p95_ttft_ms"),
    "sla_p95_e2e_ms": ("sla", "p95_e2e_ms"),
    "max_p95_ttft_ms": ("rollback", "p95_ttft_abs_ms"),
    "max_p95_e2e_ms": ("rollback", "p95_e2e_abs_ms"),
    "margin_ms": ("rollback", "margin_ms"),
    "max_error_rate": ("rollback", "error_rate"),
    "window": ("rollback", "window_requests"),
    "min_task_success": ("rollback", "task_success_min"),
    "min_tool_call_validity": ("rollback", "tool_call_validity_min"),
}


def card_limits(card: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The part of a stored card that thresholds read ({"sla", "rollback"}), or None."""
    if not card:
        return None
    picked = {key: card[key] for key in ("sla", "rollback") if card.get(key) is not None}
    return picked or None


def effective_thresholds(
    card: Mapping[str, Any] | None,
    override: Mapping[str, Any] | None,
    defaults: Thresholds,
) -> Thresholds:
    """Per field: the admin override if it names the field (null included), else the version's
    card if it sets the field, else `defaults` (the gateway's settings). `card` is a stored card
    or its `card_limits`; `override` a stored, validated override. A stored card always carries
    `rollback.window_requests` (100 unless written) when it has a `rollback` section."""
    values = asdict(defaults)
    for field_name, (section, key) in _CARD_PATHS.items():
        value = ((card or {}).get(section) or {}).get(key)
        if value is not None:
            values[field_name] = value
    values.update({k: v for k, v in (override or {}).items() if k in values})
    return Thresholds(**values)


# ------------------------------------------------------------------------------ the view

Role = Literal["stable", "canary", "fallback", "shadow"]


@dataclass(frozen=True)
class Route:
    """Where one request for an adapter goes. `address` is "base" (the base model, no adapter)
    or `name@N`, to resolve with `resolve_adapter(model=address, tenant=<the caller's tenant>)`:
    a fallback to another adapter must be resolved in the caller's scope. `version`/`version_id`
    are set for this adapter's stable, canary and shadow (the monitor's window keys)."""

    address: str
    role: Role
    version: int | None = None
    version_id: int | None = None


@dataclass(frozen=True)
class RolloutView:
    """What a gateway replica needs to route and judge one adapter. Built by
    registry.service.rollout_status / list_rollouts; `updated_at` is the adapter's
    rollout_updated_at (None: never touched by a rollout)."""

    name: str
    tenant: str
    base_model: str
    base_sha256: str
    stable_version: int | None  # what `name` serves (the pinned stable, else the newest)
    stable_version_id: int | None
    canary_version: int | None
    canary_version_id: int | None
    canary_percent: int  # 0 without a canary
    shadow_version: int | None
    shadow_version_id: int | None
    shadow_percent: int  # 0 without a shadow
    paused: bool
    stage: str | None  # the last rollout's phase: "canary", "complete", "rolled_back"
    rollback_target: str  # where a breaching stable would go: "base", "name" or "name@N"
    active_target: str | None  # where the stable's traffic goes now ("base", "name@N")
    # Whether a breaching stable falls back on its own: armed by an admin-set rollback path or
    # by the stable's card (rollback triggers, or a path other than the implicit base).
    auto_fallback: bool
    rolled_back_version: int | None
    rolled_back_at: datetime | None
    updated_at: datetime | None
    stable_card: Mapping[str, Any] | None  # card_limits() of the stable version
    canary_card: Mapping[str, Any] | None
    shadow_card: Mapping[str, Any] | None
    threshold_override: Mapping[str, Any] | None
    # The id of the adapter's newest stable_fallback or stable_restore event (None: never one):
    # a replica that missed both tells the restored stable from the one that fell back.
    fallback_event_id: int | None = None

    @property
    def canary_running(self) -> bool:
        return self.canary_version is not None

    @property
    def shadow_running(self) -> bool:
        return self.shadow_version is not None

    @property
    def in_fallback(self) -> bool:
        return self.active_target is not None

    @property
    def steers(self) -> bool:
        """Whether routing differs from plain `name` → stable (a canary or a fallback)."""
        return self.canary_running or self.in_fallback

    @property
    def watched(self) -> bool:
        """Whether a gateway replica must keep this view: it steers traffic, mirrors it to a
        shadow, or its stable is judged for an automatic fallback."""
        armed = self.auto_fallback and self.stable_version is not None
        return self.steers or self.shadow_running or armed

    def in_canary(self, caller_key: str) -> bool:
        return self.canary_running and assign(caller_key, self.name, self.canary_percent)

    def in_shadow(self, caller_key: str) -> bool:
        """Whether the caller's requests are mirrored: sticky and monotone like `assign`, in
        a namespace of its own (`shadow_bucket_key`)."""
        return self.shadow_running and assign(
            caller_key, shadow_bucket_key(self.name), self.shadow_percent
        )

    def shadow_route(self, caller_key: str) -> Route | None:
        """Where a copy of this caller's request goes, or None: only requests the stable
        serves are mirrored (a canary's or a fallback's answer compares nothing with the
        stable)."""
        if self.shadow_version is None or not self.in_shadow(caller_key):
            return None
        served = self.route(caller_key)
        if served is None or served.role != "stable":
            return None
        address = f"{self.name}@{self.shadow_version}"
        return Route(address, "shadow", self.shadow_version, self.shadow_version_id)

    def route(self, caller_key: str) -> Route | None:
        """Where this caller's request for `name` goes; None when nothing is servable."""
        if self.canary_version is not None and self.in_canary(caller_key):
            address = f"{self.name}@{self.canary_version}"
            return Route(address, "canary", self.canary_version, self.canary_version_id)
        if self.active_target is not None:
            return Route(self.active_target, "fallback")
        if self.stable_version is None:
            return None
        address = f"{self.name}@{self.stable_version}"
        return Route(address, "stable", self.stable_version, self.stable_version_id)

    def thresholds(self, version: int, defaults: Thresholds) -> Thresholds:
        """The thresholds that judge `version` of this adapter (its card, then the override)."""
        cards = {
            self.stable_version: self.stable_card,
            self.shadow_version: self.shadow_card,
            self.canary_version: self.canary_card,
        }
        card = cards.get(version)
        return effective_thresholds(card, self.threshold_override, defaults)


@dataclass(frozen=True)
class RolloutChange:
    """The outcome of promote/rollback. `acted` is False when the call found nothing to do
    (another replica acted first, or the judged version no longer serves): count a metric or
    log a transition only when it is True."""

    view: RolloutView
    acted: bool
    action: str | None = None  # the rollout event written, when acted
