"""Which version a request for an adapter name serves: this replica's copy of every rollout.

The registry is the truth (registry.service.rollout); each gateway replica polls its rollout
generation (the newest stamp) every `poll_interval_s`, and is told by RegistryWatch when
anything else changed (`mark_stale`); either way it compares every adapter's stamp with the one
it holds and reloads the adapters whose stamp differs. Stamps are writers' clocks, so "newer than
the last poll" would miss a write from a replica whose clock lags, or one that committed late;
"differs" misses nothing (each write changes its adapter's stamp). A rollback decided by any
replica is thus honoured by all within one poll interval plus a request. Routing itself is in
memory: `RolloutView.route(caller_key)` hashes the caller into
a stable bucket, so a caller keeps its version as a canary grows (1 → 10 → 50 %).

A view older than the one held is ignored (`accept`), one without a stamp included: a replica's
own write hands its view over after its commit, when a poll may have loaded a newer state
already, and the older view then stayed until the adapter's next write. One adapter's stamps
can be ordered, clocks or not: each write reads the last one under the adapter's lock and goes
past it (registry.service.rollout_log.touch).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime

from prometheus_client import Gauge

from gateway.metrics import ROLLOUT_CANARY_PERCENT, SHADOW_PERCENT
from gateway.registry_runtime import RegistryRuntime
from registry import service
from registry.rollout import RolloutView

logger = logging.getLogger(__name__)


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
        self._stamps: dict[str, datetime] = {}  # per adapter, as its view was last read
        # per adapter, the stamp of the newest view accepted, kept or not (`watched`)
        self._accepted: dict[str, datetime] = {}
        self._stale_marks = 0  # mark_stale() calls; the stamps are compared when it moved
        self._checked_marks = 0
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

    def mark_stale(self) -> None:
        """Something changed in the registry (RegistryWatch): compare the stamps at the next
        refresh even if the newest one did not move."""
        self._stale_marks += 1

    async def refresh(self) -> bool:
        """Reload the rollouts whose stamp changed; True when some did."""
        async with self._lock:
            marks = self._stale_marks
            async with self._runtime.sessions() as session:
                generation = await service.rollout_generation(session)
                if generation is None or (
                    generation == self._generation and marks == self._checked_marks
                ):
                    self._checked_marks = marks
                    return False
                stamps = await service.rollout_stamps(session)
                changed = [name for name, at in stamps.items() if self._stamps.get(name) != at]
                views = await service.list_rollouts(session, names=changed) if changed else []
            for view in views:
                self.accept(view)
            self._stamps, self._generation, self._checked_marks = stamps, generation, marks
        return bool(views)

    def accept(self, view: RolloutView) -> None:
        """Take a fresh view (from a poll, or from this replica's own admin write), unless a
        newer one of that adapter was taken already."""
        newest = self._accepted.get(view.name)
        # No stamp: read before the adapter's first rollout write (stamps are never cleared),
        # so older than any view with one.
        if newest is not None and (view.updated_at is None or view.updated_at < newest):
            return
        if view.updated_at is not None:
            self._accepted[view.name] = view.updated_at
        previous = self._views.get(view.name)
        if previous is not None and previous.canary_version not in (None, view.canary_version):
            _forget(ROLLOUT_CANARY_PERCENT, view.name, previous.canary_version)
        if view.canary_version is not None:
            ROLLOUT_CANARY_PERCENT.labels(view.name, str(view.canary_version)).set(
                view.canary_percent
            )
        if previous is not None and previous.shadow_version not in (None, view.shadow_version):
            _forget(SHADOW_PERCENT, view.name, previous.shadow_version)
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


def _forget(gauge: Gauge, name: str, version: int) -> None:
    """Drop the series of a version that left its canary or shadow (kept at 0, one series per
    version ever rolled out stayed until restart). Set to 0 first: under
    PROMETHEUS_MULTIPROC_DIR the value lives in a file that remove() leaves behind."""
    gauge.labels(name, str(version)).set(0)
    gauge.remove(name, str(version))
