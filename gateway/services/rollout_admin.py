"""Admin operations on rollouts: each is one registry transaction (with its audit row and
rollout event), then this replica takes the new view at once; the others follow within one poll
interval. Every transition is counted in loraplex_rollout_transitions_total, manual rollbacks
also in loraplex_rollbacks_total{reason="manual"}."""

from __future__ import annotations

from typing import Any

from gateway.audit_log import registry_operation
from gateway.metrics import ROLLBACKS, ROLLOUT_TRANSITIONS
from gateway.registry_runtime import RegistryRuntime
from gateway.rollout_controller import RolloutController
from gateway.rollout_router import RolloutRouter
from registry import service
from registry.rollout import RolloutChange, RolloutView


class RolloutAdmin:
    def __init__(
        self,
        runtime: RegistryRuntime,
        router: RolloutRouter,
        controller: RolloutController | None = None,
    ):
        self._runtime = runtime
        self._router = router
        self._controller = controller

    async def status(self, name: str) -> tuple[RolloutView, list[Any]]:
        async with self._runtime.sessions() as session:
            view = await service.rollout_status(session, name=name)
            events = await service.list_rollout_events(session, name=name, limit=20)
        return view, events

    def windows(self, view: RolloutView) -> dict[str, dict[str, Any]]:
        """This replica's monitor windows of the view's stable, canary and shadow versions
        ("name@N" → samples, p95 TTFT/latency, error rate); a version with none is left out.
        A shadow's are those of the copies mirrored to it."""
        if self._controller is None:
            return {}
        found = {}
        wanted = (
            (view.stable_version, False),
            (view.canary_version, False),
            (view.shadow_version, True),
        )
        for version, shadow in wanted:
            if version is None:
                continue
            figures = self._controller.figures(view.name, version, shadow=shadow)
            if figures is not None:
                found[f"{view.name}@{version}"] = figures.as_dict()
        return found

    async def start_shadow(
        self, name: str, version: int, percent: int, reason: str | None, actor: str
    ) -> RolloutView:
        async with (
            registry_operation("shadow_start", actor, adapter=name, version=version),
            self._runtime.sessions() as session,
        ):
            view = await service.start_shadow(
                session, name=name, version=version, percent=percent, actor=actor, reason=reason
            )
        return self._took(view, "shadow_start", version)

    async def stop_shadow(self, name: str, reason: str | None, actor: str) -> RolloutView:
        async with (
            registry_operation("shadow_stop", actor, adapter=name),
            self._runtime.sessions() as session,
        ):
            before = await service.rollout_status(session, name=name)
            view = await service.stop_shadow(session, name=name, actor=actor, reason=reason)
        return self._took(view, "shadow_stop", before.shadow_version)

    async def start(
        self, name: str, version: int, percent: int, force: bool, reason: str | None, actor: str
    ) -> RolloutView:
        async with (
            registry_operation("rollout_start", actor, adapter=name, version=version),
            self._runtime.sessions() as session,
        ):
            view = await service.start_rollout(
                session,
                name=name,
                version=version,
                actor=actor,
                percent=percent,
                force=force,
                reason=reason,
            )
        return self._took(view, "start", version)

    async def promote(self, name: str, to_percent: int | None, actor: str) -> RolloutView:
        async with (
            registry_operation("rollout_promote", actor, adapter=name),
            self._runtime.sessions() as session,
        ):
            change = await service.promote(session, name=name, actor=actor, to_percent=to_percent)
        return self._changed(change)

    async def pause(self, name: str, resume: bool, actor: str) -> RolloutView:
        operation = "rollout_resume" if resume else "rollout_pause"
        call = service.resume_rollout if resume else service.pause_rollout
        async with (
            registry_operation(operation, actor, adapter=name),
            self._runtime.sessions() as session,
        ):
            view = await call(session, name=name, actor=actor)
        return self._took(view, "resume" if resume else "pause", view.canary_version)

    async def rollback(self, name: str, reason: str, actor: str) -> RolloutView:
        async with (
            registry_operation("rollout_rollback", actor, adapter=name),
            self._runtime.sessions() as session,
        ):
            change = await service.rollback(
                session, name=name, actor=actor, reason=reason, automatic=False
            )
        return self._changed(change, rollback_reason="manual")

    async def restore(self, name: str, actor: str) -> RolloutView:
        async with (
            registry_operation("rollout_restore", actor, adapter=name),
            self._runtime.sessions() as session,
        ):
            view = await service.restore_stable(session, name=name, actor=actor)
        return self._took(view, "stable_restore", view.stable_version)

    async def set_rollback_path(self, name: str, target: str | None, actor: str) -> RolloutView:
        async with (
            registry_operation("rollout_path", actor, adapter=name),
            self._runtime.sessions() as session,
        ):
            view = await service.set_rollback_path(session, name=name, target=target, actor=actor)
        self._router.accept(view)
        return view

    async def set_thresholds(
        self, name: str, thresholds: dict[str, Any] | None, actor: str
    ) -> RolloutView:
        async with (
            registry_operation("rollout_thresholds", actor, adapter=name),
            self._runtime.sessions() as session,
        ):
            view = await service.set_thresholds(
                session, name=name, thresholds=thresholds, actor=actor
            )
        self._router.accept(view)
        return view

    def _took(self, view: RolloutView, action: str, version: int | None) -> RolloutView:
        ROLLOUT_TRANSITIONS.labels(view.name, _label(version), action).inc()
        self._router.accept(view)
        return view

    def _changed(self, change: RolloutChange, rollback_reason: str | None = None) -> RolloutView:
        view = change.view
        if change.acted and change.action is not None:
            version = view.rolled_back_version if change.action == "rollback" else None
            version = version or view.canary_version or view.stable_version
            ROLLOUT_TRANSITIONS.labels(view.name, _label(version), change.action).inc()
            if rollback_reason is not None and change.action in ("rollback", "stable_fallback"):
                ROLLBACKS.labels(view.name, _label(version), rollback_reason).inc()
        self._router.accept(view)
        return view


def _label(version: int | None) -> str:
    return "" if version is None else str(version)
