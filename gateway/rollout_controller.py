"""Automatic rollback (and optional promotion) of canaries from what users actually got.

Every finished request of a version that a rollout is steering is one observation in that
version's sliding window (gateway/rollback_monitor.py). A verdict on the canary rolls it back in
the registry at once (all traffic to the stable, the window's figures recorded); a healthy full
window may promote it one stage. The registry call names the version judged, so two replicas
deciding at once roll back once. Requests already running keep their version to the end.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import asdict
from typing import Any

from gateway.metrics import ROLLBACKS, ROLLOUT_TRANSITIONS
from gateway.registry_runtime import RegistryRuntime
from gateway.request_metrics import GenerationRecorder
from gateway.rollback_monitor import RollbackMonitor, Verdict, WindowLimits
from gateway.rollout_router import RolloutRouter
from registry import service
from registry.rollout import RolloutView, Thresholds

logger = logging.getLogger(__name__)
ACTOR = "rollout-monitor"


class RolloutController:
    def __init__(
        self,
        runtime: RegistryRuntime,
        router: RolloutRouter,
        defaults: Thresholds,
        *,
        auto_promote: bool = False,
    ):
        self._runtime = runtime
        self._router = router
        self._defaults = defaults
        self._auto_promote = auto_promote
        self._monitor = RollbackMonitor()
        self._acting: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def observe(self, adapter: str, version: int | None, recorder: GenerationRecorder) -> None:
        """One finished request. Client disconnects say nothing about the version: skipped."""
        if version is None or not (recorder.completed or recorder.failed):
            return
        view = self._router.view(adapter)
        if view is None or view.canary_version != version or view.canary_version_id is None:
            return
        limits = self._limits(view, version)
        ttft = None
        if recorder.first_token_at is not None:
            ttft = recorder.first_token_at - recorder.started
        verdict = self._monitor.observe(
            view.canary_version_id,
            limits,
            ttft_s=ttft,
            e2e_s=recorder.finished_at - recorder.started,
            error=recorder.failed,
        )
        if verdict is not None:
            self._spawn(self._roll_back(view, version, verdict))
        elif (
            self._auto_promote
            and not view.paused
            and self._monitor.healthy(view.canary_version_id, limits)
        ):
            self._monitor.reset(view.canary_version_id)
            self._spawn(self._promote(view, version))

    def _limits(self, view: RolloutView, version: int) -> WindowLimits:
        fields = asdict(view.thresholds(version, self._defaults))
        fields["max_error_rate"] = min(fields["max_error_rate"], 0.999)
        return WindowLimits(**fields)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _roll_back(self, view: RolloutView, version: int, verdict: Verdict) -> None:
        version_id = view.canary_version_id or 0
        if version_id in self._acting:
            return
        self._acting.add(version_id)
        try:
            async with self._runtime.sessions() as session:
                change = await service.rollback(
                    session,
                    name=view.name,
                    actor=ACTOR,
                    reason=verdict.detail,
                    automatic=True,
                    figures=verdict.figures.as_dict(),
                    version=version,
                )
            self._router.accept(change.view)
            if change.acted:
                ROLLBACKS.labels(view.name, str(version), verdict.reason).inc()
                ROLLOUT_TRANSITIONS.labels(view.name, str(version), "rollback").inc()
                logger.warning("rolled back %s@%d: %s", view.name, version, verdict.detail)
        except Exception:
            logger.exception("automatic rollback of %s@%d failed", view.name, version)
        finally:
            self._acting.discard(version_id)
            self._monitor.reset(version_id)

    async def _promote(self, view: RolloutView, version: int) -> None:
        try:
            async with self._runtime.sessions() as session:
                change = await service.promote(
                    session,
                    name=view.name,
                    actor=ACTOR,
                    version=version,
                    from_percent=view.canary_percent,
                    automatic=True,
                    reason="healthy window",
                )
            self._router.accept(change.view)
            if change.acted and change.action is not None:
                ROLLOUT_TRANSITIONS.labels(view.name, str(version), change.action).inc()
        except Exception:
            logger.exception("automatic promotion of %s@%d failed", view.name, version)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
