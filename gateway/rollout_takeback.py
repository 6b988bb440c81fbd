"""Acting on a verdict until it acts: roll a failing canary back, move an armed stable's traffic
to its fallback target, and retry what the registry did not do.

The monitor empties a window when it judges it, so a verdict dropped after a failed registry
call left a breaching canary its traffic until a whole new window of bad requests filled. A
verdict therefore stays pending until it acts or its version leaves the role it was judged in
(`judged_role`; the registry call names the role too, so a stale one never acts):
- a refused fallback (its target breaching too) is audited once and tried again only after
  FALLBACK_RETRY_S, and the stable keeps serving meanwhile;
- a failed registry call (unreachable, a lock wait, a failover) is retried with backoff; an
  error that is neither is a bug, given up after MAX_ACTION_ATTEMPTS;
- a safety incident is reported once, so it is never dropped while its role lasts: it waits its
  turn behind a call in flight or a wait, and one about a newer role (the stable restored, the
  canary restarted) replaces the older one's;
- one retry task per key at a time: two loops doubled the registry calls and skipped the wait
  after a refusal.
gateway/rollout_controller.py decides when a version is judged; this module only acts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from gateway.metrics import ROLLBACKS, ROLLOUT_TRANSITIONS
from gateway.registry_runtime import RegistryRuntime
from gateway.rollback_monitor import Verdict
from gateway.rollout_router import RolloutRouter
from registry import service
from registry.db import is_contention, is_unreachable
from registry.errors import RollbackRefused
from registry.rollout import RolloutView

logger = logging.getLogger(__name__)
ACTOR = "rollout-monitor"
# After a refused fallback (its target breaching too): how long before trying again. Each try
# writes an audit row; under heavy traffic a window fills in a second.
FALLBACK_RETRY_S = 60.0
# After a failed registry call: the first retry's delay, doubled per failure up to
# ACTION_RETRY_MAX_S (a failover takes seconds to tens of seconds; each try is one connection).
ACTION_RETRY_S = 0.5
ACTION_RETRY_MAX_S = 30.0
# Attempts of one verdict's action on an error that is no outage (outages retry until the
# registry answers or the version leaves its role).
MAX_ACTION_ATTEMPTS = 4


def served_address(adapter: str, version: int | None) -> str:
    """The key for what served a request, in the monitor's windows and in TakeBacks: "name@N",
    or "base" for the base model."""
    return "base" if not adapter or version is None else f"{adapter}@{version}"


def judged_role(view: RolloutView, *, stable: bool) -> tuple[object, ...]:
    """What a verdict was about, as `observe` tells one judged window from the next: when it
    differs, the version is no longer what the evidence judged (rolled back, restarted, fell
    back or restored elsewhere), and a pending verdict is dropped."""
    if stable:
        return (view.stable_version, view.active_target, view.fallback_event_id)
    return (view.canary_version, view.rolled_back_at)


@dataclass
class _PendingVerdict:
    """A verdict whose registry call failed, kept for the next try."""

    view: RolloutView
    version: int
    verdict: Verdict
    stable: bool
    failures: int


class TakeBacks:
    """Every served address's verdict in progress: the call in flight, the wait after a refusal
    or a failure, and the verdict pending for the next try. Its tasks run through `spawn` (the
    controller's), so closing the controller stops the retries too; `reset` empties the
    address's windows once its verdict is spent."""

    def __init__(
        self,
        runtime: RegistryRuntime,
        router: RolloutRouter,
        *,
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
        reset: Callable[[str], None],
        failing: Callable[[], set[str]],
        fallback_retry_s: float,
        action_retry_s: float,
    ):
        self._runtime = runtime
        self._router = router
        self._spawn = spawn
        self._reset = reset
        self._failing = failing  # never a fallback target
        self._fallback_retry_s = fallback_retry_s
        self._action_retry_s = action_retry_s
        self._acting: set[str] = set()
        self._retry_at: dict[str, float] = {}
        self._pending: dict[str, _PendingVerdict] = {}
        self._retries: dict[str, asyncio.Task[None]] = {}  # at most one retry per key

    async def take_back(
        self, view: RolloutView, version: int, verdict: Verdict, *, stable: bool
    ) -> None:
        """Roll the canary back, or (stable=True) move the stable's traffic to its target."""
        key = served_address(view.name, version)
        if key in self._acting or self._retry_at.get(key, 0.0) > time.monotonic():
            self._wait_turn(key, view, version, verdict, stable)
            return
        self._acting.add(key)
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
                    role="stable" if stable else "canary",
                    failing=self._failing() if stable else (),
                )
            self._router.accept(change.view)
            if change.acted:
                action = change.action or "rollback"
                ROLLBACKS.labels(view.name, str(version), verdict.reason).inc()
                ROLLOUT_TRANSITIONS.labels(view.name, str(version), action).inc()
                logger.warning("%s of %s: %s", action, key, verdict.detail)
        except RollbackRefused as refused:
            self._retry_at[key] = time.monotonic() + self._fallback_retry_s
            ROLLOUT_TRANSITIONS.labels(view.name, str(version), "fallback_refused").inc()
            logger.warning(
                "stable %s breached (%s) but its fallback was refused (%s); it keeps serving, "
                "next try in %.0f s",
                key,
                verdict.detail,
                "; ".join(p.message for p in refused.problems),
                self._fallback_retry_s,
            )
            if verdict.persistent:
                # Tried again after the wait, until it acts or the version leaves its role.
                self._keep_pending(key, _PendingVerdict(view, version, verdict, stable, 0))
            if self._pending_incident(key):
                self._schedule_retry(key)
                return
        except Exception as exc:
            previous = self._pending.get(key)
            failures = 1 if previous is None else previous.failures + 1
            pending = _PendingVerdict(view, version, verdict, stable, failures)
            if previous is not None and previous.verdict.persistent:
                # An incident reported while this call ran outranks it (and is the newer).
                pending = dataclasses.replace(previous, failures=failures)
            retryable = is_unreachable(exc) or is_contention(exc) or pending.verdict.persistent
            if failures > MAX_ACTION_ATTEMPTS and not retryable:
                # Not an outage nor a lock wait, and it keeps failing: a bug, which retrying
                # every 30 s with a traceback will not fix. The next breach's verdict tries again.
                logger.exception(
                    "automatic action on %s failed %d times; giving up on this verdict",
                    key,
                    failures,
                )
                self._pending.pop(key, None)
                self._retry_at.pop(key, None)
                self._reset(key)
                return
            delay = min(self._action_retry_s * 2 ** (failures - 1), ACTION_RETRY_MAX_S)
            self._pending[key] = pending
            self._retry_at[key] = time.monotonic() + delay
            logger.exception(
                "automatic %s of %s failed; retrying in %.1f s",
                "fallback" if stable else "rollback",
                key,
                delay,
            )
            self._schedule_retry(key)
            return  # the evidence stays: the verdict is pending, not spent
        finally:
            self._acting.discard(key)
        if self._pending_incident(key, other_than=verdict):
            self._schedule_retry(key)  # an incident reported while this call ran: its turn now
        else:
            self._pending.pop(key, None)
        self._reset(key)

    def _wait_turn(
        self, key: str, view: RolloutView, version: int, verdict: Verdict, stable: bool
    ) -> None:
        """A verdict on `key` while an action on it runs, or waits after a refusal or a failed
        call. A latency verdict refreshes a failed call's pending one (the newest evidence) or
        is dropped: the next window judges again. A safety incident is reported once: it
        waits its turn, never dropped."""
        pending = self._pending.get(key)
        if verdict.persistent:
            failures = 0 if pending is None else pending.failures
            self._keep_pending(key, _PendingVerdict(view, version, verdict, stable, failures))
            if key not in self._acting:  # else the call in flight hands over when it ends
                self._schedule_retry(key)
        elif pending is not None and key not in self._acting and not pending.verdict.persistent:
            pending.view, pending.verdict = view, verdict

    def _keep_pending(self, key: str, incident: _PendingVerdict) -> None:
        """Keep `incident` pending unless an incident about the same role already is: the one
        about a newer role (the stable restored, the canary restarted) replaces it, as the
        retry drops whatever is about a role that ended."""
        pending = self._pending.get(key)
        if (
            pending is None
            or not pending.verdict.persistent
            or judged_role(pending.view, stable=pending.stable)
            != judged_role(incident.view, stable=incident.stable)
        ):
            self._pending[key] = incident

    def _pending_incident(self, key: str, other_than: Verdict | None = None) -> bool:
        pending = self._pending.get(key)
        return (
            pending is not None and pending.verdict.persistent and pending.verdict is not other_than
        )

    def _schedule_retry(self, key: str) -> None:
        """One retry per key at a time, at the end of its wait (`_retry_at`) or shortly: two
        loops for one key doubled the registry calls and skipped the wait after a refusal."""
        retrying = self._retries.get(key)
        if retrying is not None and not retrying.done():
            return
        delay = max(self._retry_at.get(key, 0.0) - time.monotonic(), self._action_retry_s)
        self._retries[key] = self._spawn(self._retry(key, delay))

    async def _retry(self, key: str, delay: float) -> None:
        """Try a pending verdict again after `delay`, unless its version left the role it was
        judged in meanwhile (the registry call names the role too; this spares the call)."""
        await asyncio.sleep(delay)
        self._retries.pop(key, None)  # this one: a new wait from here schedules a new retry
        pending = self._pending.get(key)
        if pending is None:
            return
        current = self._router.view(pending.view.name)
        if current is None or judged_role(current, stable=pending.stable) != judged_role(
            pending.view, stable=pending.stable
        ):
            del self._pending[key]
            self._retry_at.pop(key, None)
            logger.info("pending verdict on %s dropped: its rollout changed meanwhile", key)
            return
        if self._retry_at.get(key, 0.0) > time.monotonic() or key in self._acting:
            self._schedule_retry(key)  # a later wait began meanwhile: honour it
            return
        self._retry_at.pop(key, None)
        await self.take_back(current, pending.version, pending.verdict, stable=pending.stable)
