"""Which version a request for an adapter name serves: this replica's copy of every rollout.

The registry is the truth (registry.service.rollout); each gateway replica polls its rollout
generation (a timestamp that only grows) every `poll_interval_s` and reloads the adapters that
changed, so a rollback decided by any replica is honoured by all within one poll interval plus
a request. Routing itself is in memory: `RolloutView.route(caller_key)` hashes the caller into
a stable bucket, so a caller keeps its version as a canary grows (1 → 10 → 50 %).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from gateway.metrics import ROLLOUT_CANARY_PERCENT, SHADOW_PERCENT
from gateway.registry_runtime import RegistryRuntime
from registry import service
from registry.rollout import RolloutView

logger = logging.getLogger(__name__)
# Writes can commit out of timestamp order across replicas; re-read a little behind the mark.
POLL_OVERLAP = timedelta(seconds=5)


def sticky_key(user: str | None, session_id: str | None, key_id: str) -> str:
    """The OpenAI `user` field, else the X-Session-Id header, else the API key: the first one
    the caller controls decides its bucket."""
    if user:
        return f"user:{user}"
    if session_id:
        return f"session:{session_id}"
    return f"key:{key_id}"


class RolloutRouter:
    def __init__(
        self,
        runtime: RegistryRuntime,
        *,
        poll_interval_s: float = 0.5,
        on_change: Callable[[], None] | None = None,
    ):
        self._runtime = runtime
        self._interval = poll_interval_s
        self.on_change = on_change  # e.g. the catalog's cache invalidation
        self._views: dict[str, RolloutView] = {}
        self._generation: datetime | None = None
        self._lock = asyncio.Lock()

    def view(self, name: str) -> RolloutView | None:
        return self._views.get(name)

    def route(self, name: str, caller_key: str) -> str | None:
        """The address ("name@N" or "base") serving `name` for this caller, or None when no
        rollout steers it (then `name` means its stable, as the catalog resolves it)."""
        view = self._views.get(name)
        if view is None or not view.steers:
            return None  # only watched (fallback armed, a shadow): `name` is its stable
        route = view.route(caller_key)
        return None if route is None else route.address

    async def refresh(self) -> bool:
        """Reload changed rollouts; True when something changed."""
        async with self._lock:
            runtime = self._runtime
            async with runtime.sessions() as session:
                generation = await service.rollout_generation(session)
                if generation is None or generation == self._generation:
                    return False
                since = None if self._generation is None else self._generation - POLL_OVERLAP
                views = await service.list_rollouts(session, since=since)
            for view in views:
                self.accept(view)
            self._generation = generation
        return True

    def accept(self, view: RolloutView) -> None:
        """Take a fresh view (from a poll, or from this replica's own admin write)."""
        previous = self._views.get(view.name)
        if previous is not None and previous.canary_version not in (None, view.canary_version):
            ROLLOUT_CANARY_PERCENT.labels(view.name, str(previous.canary_version)).set(0)
        if view.canary_version is not None:
            ROLLOUT_CANARY_PERCENT.labels(view.name, str(view.canary_version)).set(
                view.canary_percent
            )
        if previous is not None and previous.shadow_version not in (None, view.shadow_version):
            SHADOW_PERCENT.labels(view.name, str(previous.shadow_version)).set(0)
        if view.shadow_version is not None:
            SHADOW_PERCENT.labels(view.name, str(view.shadow_version)).set(view.shadow_percent)
        if view.watched:
            self._views[view.name] = view
        else:
            self._views.pop(view.name, None)
        if self.on_change is not None:
            self.on_change()  # `name` may mean another stable now (a completed rollout)

    async def run(self) -> None:
        """Poll until cancelled; a failed poll is logged and retried on the next tick."""
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("rollout poll failed; retrying", exc_info=True)
            await asyncio.sleep(self._interval)
