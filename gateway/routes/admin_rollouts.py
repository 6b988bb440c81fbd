from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from gateway.admin_auth import AdminDep
from gateway.deps import RolloutAdminDep
from gateway.schemas.admin import ChangeReason
from gateway.schemas.admin_rollout import (
    PromoteRollout,
    RollbackPath,
    RolloutOut,
    StartRollout,
    StartShadow,
    ThresholdsOverride,
)
from registry.rollout import RolloutView

router = APIRouter(prefix="/admin/v1/rollouts", tags=["admin: rollouts"])


def rollout_out(
    view: RolloutView,
    events: list[Any] | None = None,
    windows: dict[str, dict[str, Any]] | None = None,
) -> RolloutOut:
    return RolloutOut(
        name=view.name,
        stable_version=view.stable_version,
        canary_version=view.canary_version,
        canary_percent=view.canary_percent,
        shadow_version=view.shadow_version,
        shadow_percent=view.shadow_percent,
        paused=view.paused,
        stage=view.stage,
        rollback_target=view.rollback_target,
        active_target=view.active_target,
        auto_fallback=view.auto_fallback,
        rolled_back_version=view.rolled_back_version,
        rolled_back_at=view.rolled_back_at,
        updated_at=view.updated_at,
        threshold_override=dict(view.threshold_override) if view.threshold_override else None,
        events=None
        if events is None
        else [
            {
                "at": e.at,
                "action": e.action,
                "from_version": e.from_version,
                "to_version": e.to_version,
                "percent": e.percent,
                "reason": e.reason,
                "figures": e.figures,
                "actor": e.actor,
            }
            for e in events
        ],
        windows=windows,
    )


@router.get("/{name}")
async def rollout_status(name: str, actor: AdminDep, admin: RolloutAdminDep) -> RolloutOut:
    """Where an adapter's traffic goes now, with its last rollout events and this replica's
    monitor windows."""
    view, events = await admin.status(name)
    return rollout_out(view, events, admin.windows(view))


@router.post("/{name}/start")
async def start_rollout(
    name: str, body: StartRollout, actor: AdminDep, admin: RolloutAdminDep
) -> RolloutOut:
    """Start a canary of an evaluated version at 1 % (or a later stage)."""
    view = await admin.start(name, body.version, body.percent, body.force, body.reason, actor)
    return rollout_out(view)


@router.post("/{name}/shadow")
async def start_shadow(
    name: str, body: StartShadow, actor: AdminDep, admin: RolloutAdminDep
) -> RolloutOut:
    """Mirror a share of the stable's requests to an evaluated version; its output is only
    compared (divergence, latency in loraplex_shadow_* metrics), never shown."""
    view = await admin.start_shadow(name, body.version, body.percent, body.reason, actor)
    return rollout_out(view)


@router.delete("/{name}/shadow")
async def stop_shadow(
    name: str,
    actor: AdminDep,
    admin: RolloutAdminDep,
    reason: Annotated[str | None, Query(max_length=500)] = None,
) -> RolloutOut:
    """Stop mirroring; the candidate returns to evaluated."""
    return rollout_out(await admin.stop_shadow(name, reason, actor))


@router.post("/{name}/promote")
async def promote_rollout(
    name: str, actor: AdminDep, admin: RolloutAdminDep, body: PromoteRollout | None = None
) -> RolloutOut:
    """Move the canary to the next stage (or to_percent); at 100 % it becomes the stable."""
    return rollout_out(await admin.promote(name, body.to_percent if body else None, actor))


@router.post("/{name}/pause")
async def pause_rollout(name: str, actor: AdminDep, admin: RolloutAdminDep) -> RolloutOut:
    """Freeze the split: no promotion until resumed (rollback still works)."""
    return rollout_out(await admin.pause(name, resume=False, actor=actor))


@router.post("/{name}/resume")
async def resume_rollout(name: str, actor: AdminDep, admin: RolloutAdminDep) -> RolloutOut:
    """Resume a paused rollout."""
    return rollout_out(await admin.pause(name, resume=True, actor=actor))


@router.post("/{name}/rollback")
async def rollback_rollout(
    name: str, actor: AdminDep, admin: RolloutAdminDep, body: ChangeReason | None = None
) -> RolloutOut:
    """Canary running: all traffic back to the stable. Otherwise: the stable's traffic to its
    rollback target."""
    reason = (body.reason if body else None) or "manual rollback"
    return rollout_out(await admin.rollback(name, reason, actor))


@router.post("/{name}/restore")
async def restore_stable(name: str, actor: AdminDep, admin: RolloutAdminDep) -> RolloutOut:
    """Send the stable's traffic back to it after a fallback."""
    return rollout_out(await admin.restore(name, actor))


@router.put("/{name}/rollback-path")
async def set_rollback_path(
    name: str, body: RollbackPath, actor: AdminDep, admin: RolloutAdminDep
) -> RolloutOut:
    """Where a breaching stable's traffic goes (validated: same base, same tenant, no cycle)."""
    return rollout_out(await admin.set_rollback_path(name, body.target, actor))


@router.put("/{name}/thresholds")
async def set_thresholds(
    name: str, body: ThresholdsOverride, actor: AdminDep, admin: RolloutAdminDep
) -> RolloutOut:
    """Override the card's and the global rollback thresholds for this adapter ({} clears)."""
    override = body.model_dump(exclude_none=True) or None
    return rollout_out(await admin.set_thresholds(name, override, actor))
