"""The record every rollout write leaves: the adapter's `rollout_updated_at` stamp (what polling
replicas watch), one rollout_events row and one audit row, all in the caller's transaction."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from registry.models import Adapter, RolloutEvent, utcnow
from registry.service.audit import record


def touch(adapter: Adapter) -> None:
    """Stamp the change for polling replicas; strictly increasing per adapter."""
    now = utcnow()
    last = adapter.rollout_updated_at
    adapter.rollout_updated_at = (
        now if last is None or now > last else last + timedelta(microseconds=1)
    )


def touch_if_tracked(adapter: Adapter) -> None:
    """Stamp an adapter that replicas hold a view of (any rollout write, ever), so a change of
    what its name serves (a new version, a retired stable) reaches their copy too."""
    if adapter.rollout_updated_at is not None:
        touch(adapter)


def log_event(
    session: AsyncSession,
    adapter: Adapter,
    action: str,
    *,
    actor: str,
    from_version: int | None = None,
    to_version: int | None = None,
    target: str | None = None,
    percent: int | None = None,
    reason: str | None = None,
    figures: Mapping[str, Any] | None = None,
    automatic: bool = False,
    details: dict[str, Any] | None = None,
) -> None:
    """Stamp the adapter and stage the rollout event and its audit row."""
    touch(adapter)
    cleaned = _json_figures(figures)
    event = RolloutEvent(
        adapter_id=adapter.id,
        action=action,
        from_version=from_version,
        to_version=to_version,
        target=target,
        percent=percent,
        reason=reason[:500] if reason else None,
        figures=cleaned,
        automatic=automatic,
        actor=actor[:200],
    )
    session.add(event)
    record(
        session,
        actor=actor,
        action=f"rollout.{action}",
        target=f"adapter:{adapter.name}",
        details={
            "from_version": from_version,
            "to_version": to_version,
            "target": target,
            "percent": percent,
            "reason": event.reason,
            "figures": cleaned,
            "automatic": automatic,
            **(details or {}),
        },
    )


def _json_figures(figures: Mapping[str, Any] | None) -> dict[str, Any] | None:
    # Never let an odd number (inf, NaN: not JSON) stop an automatic rollback from recording.
    if figures is None:
        return None
    return {
        str(k): (None if isinstance(v, float) and not math.isfinite(v) else v)
        for k, v in figures.items()
    }
