"""Automatic rollback (and optional promotion) from what users actually got.

Every finished request is one observation in its version's sliding window
(gateway/rollback_monitor.py), keyed by the address that served it ("name@N", "base"):
- a canary's verdict rolls it back in the registry at once (all traffic to the stable, the
  window's figures recorded); a healthy full window may promote it one stage;
- an armed stable's verdict (a rollback path set by an admin or its card) moves its traffic to
  that path, unless the target is breaching too: then the refusal is audited once and retried
  only after FALLBACK_RETRY_S (gateway/rollout_takeback.py), and the stable keeps serving;
- every other version's window is evidence about it as a possible fallback target;
- a shadow candidate's mirrored requests (gateway/shadow.py) fill a shadow window of their own
  (`shadow_key`), recorded and never judged: it serves nobody, so there is nothing to roll
  back, but an operator reads its figures beside the stable's before starting a canary.
Only the adapter owner's requests routed by the rollout are evidence (the base's: anyone's):
a tenant the adapter is shared with, or a caller pinning `name@N`, picks its own prompt
lengths and max_tokens, and its requests would otherwise roll back, fall back or promote
another tenant's versions.
A window holds only evidence about the version in its current role: a canary's starts empty
when the canary (re)starts, a stable's when it falls back, is restored or is a new stable, and
stable requests that end while it is in fallback are not recorded. A client that hung up after
a latency bound counts as a request at least that slow (`request_sample`); one that hung up
earlier counts as nothing.
The registry call names the version judged and its role, so two replicas deciding at once act
once and a stale canary verdict never moves the stable that the canary has become.
A verdict whose registry call fails (the database unreachable, locked, failing over) stays
pending and is retried with backoff until it acts or the version leaves the role it was judged
in (gateway/rollout_takeback.py): the monitor emptied the window at the verdict, so dropping it
left a breaching canary its traffic until a whole new window of bad requests filled.
Callers' feedback (POST /v1/feedback, gateway/outcome_monitor.py) judges the same versions on
the same terms, from the adapter owner's responses only: a full window of success/failure
verdicts under `min_task_success` is a verdict (reason task_success), and one safety incident is
one at once (reason safety_incident). So are the tool calls a version wrote under tool_choice
"auto" (gateway.services.tool_call_checks): a full window of them under
`min_tool_call_validity` valid is a verdict (reason tool_calls). A canary is rolled back; an
armed stable falls back.
Requests already running keep their version to the end; restoring a fallen-back stable is an
operator's decision (`loraplex rollout restore`), so traffic never flaps between the two.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Coroutine, Hashable
from dataclasses import asdict, dataclass
from typing import Any

from gateway.metrics import ROLLOUT_TRANSITIONS
from gateway.outcome_monitor import (
    TASK_OUTCOMES,
    Outcome,
    OutcomeWindows,
    ToolCallFigures,
    judge_task_success,
    judge_tool_calls,
    safety_verdict,
)
from gateway.registry_runtime import RegistryRuntime
from gateway.request_metrics import GenerationRecorder
from gateway.rollback_monitor import (
    RollbackMonitor,
    Sample,
    Verdict,
    WindowFigures,
    WindowLimits,
    hang_up_sample,
)
from gateway.rollout_router import RolloutRouter
from gateway.rollout_takeback import (
    ACTION_RETRY_S,
    ACTOR,
    FALLBACK_RETRY_S,
    TakeBacks,
    judged_role,
    served_address,
)
from registry import service
from registry.rollout import RolloutView, Thresholds

logger = logging.getLogger(__name__)


def errors_key(address: str) -> tuple[str, str]:
    """The monitor's key for every caller's outcomes of `address` (error rate only): apart
    from the owner's routed requests, whose latency is judged too (`ServedModel.judged_by`)."""
    return ("errors", address)


def shadow_key(adapter: str, version: int) -> tuple[str, str]:
    """The monitor's key for the copies mirrored to a shadow candidate: apart from
    served_address's, so mirrored and served traffic never share a window."""
    return ("shadow", f"{adapter}@{version}")


def request_sample(recorder: GenerationRecorder, limits: WindowLimits) -> Sample | None:
    """What a finished request tells its version's window. Completed or failed: its TTFT,
    latency and outcome. The client hung up: nothing, unless it hung up after a latency bound
    (`hang_up_sample`); otherwise a canary every client gives up on would never fill a window
    and never be rolled back."""
    ttft = None
    if recorder.first_token_at is not None:
        ttft = recorder.first_token_at - recorder.started
    elapsed = recorder.finished_at - recorder.started
    if recorder.completed or recorder.failed:
        return Sample(ttft, elapsed, recorder.failed)
    return hang_up_sample(ttft, elapsed, limits, streamed=recorder.streamed)


@dataclass(frozen=True)
class Judging:
    """Where one piece of outcome evidence about a version in a rollout role goes."""

    view: RolloutView
    version: int
    stable: bool  # an armed stable (else the canary)
    key: Hashable  # its outcome window
    limits: WindowLimits


class RolloutController:
    def __init__(
        self,
        runtime: RegistryRuntime,
        router: RolloutRouter,
        defaults: Thresholds,
        *,
        auto_promote: bool = False,
        fallback_retry_s: float = FALLBACK_RETRY_S,
        action_retry_s: float = ACTION_RETRY_S,
    ):
        self._runtime = runtime
        self._router = router
        self._defaults = defaults
        self._auto_promote = auto_promote
        self._monitor = RollbackMonitor()
        self._outcomes = OutcomeWindows()
        self._tasks: set[asyncio.Task[None]] = set()
        self._take_backs = TakeBacks(
            runtime,
            router,
            spawn=self._spawn,
            reset=self._reset,
            failing=self.failing_addresses,
            fallback_retry_s=fallback_retry_s,
            action_retry_s=action_retry_s,
        )
        # adapter -> the canary whose window is being judged (its version, and the previous
        # rollback's time, which tells a restarted canary of the same version apart)
        self._canary_judged: dict[str, tuple[int, object]] = {}
        # adapter -> the stable whose window is being judged (its version, where its traffic
        # goes, and the last fallback/restore event: a restored stable starts a new window)
        self._stable_judged: dict[str, tuple[int, str | None, int | None]] = {}

    def observe(
        self,
        adapter: str,
        version: int | None,
        recorder: GenerationRecorder,
        *,
        judged: bool = True,
    ) -> None:
        """One finished request. A client that hung up says something only when it hung up
        after a latency bound (`request_sample`): that request was at least that slow.
        `judged` False (`ServedModel.judged_by`: a pinned `name@N`, or a tenant the adapter is
        shared with): its caller chose its prompt and max_tokens, so its latency says nothing
        about the version; whether the server failed it does, in a window of its own
        (`errors_key`) judged on the error rate alone: a canary failing every consumer request
        was never rolled back when it had none."""
        address = served_address(adapter, version)
        view = self._router.view(adapter) if address != "base" else None
        limits = self._limits(view, version)
        key: Hashable = address
        if judged:
            sample = request_sample(recorder, limits)
        elif recorder.completed or recorder.failed:
            sample = Sample(None, 0.0, recorder.failed)  # latency never breaches: errors only
            key = errors_key(address)
        else:
            sample = None
        if sample is None:
            return
        if view is None or version is None:
            self._monitor.record(key, limits, **sample.fields())
            return
        if version == view.canary_version:
            canary = (version, view.rolled_back_at)
            if self._canary_judged.get(adapter) != canary:
                # A canary is judged on its own traffic only: the windows may hold an earlier
                # canary's samples of the same version, or requests from before it started.
                self._reset(address)
                self._canary_judged[adapter] = canary
            verdict = self._monitor.observe(key, limits, **sample.fields())
            if verdict is not None:
                self._spawn(self._take_backs.take_back(view, version, verdict, stable=False))
            elif (
                judged
                and self._auto_promote
                and not view.paused
                and self._monitor.healthy(key, limits)
            ):
                self._reset(address)
                self._spawn(self._promote(view, version))
        elif version == view.stable_version:
            stable = (version, view.active_target, view.fallback_event_id)
            if self._stable_judged.get(adapter) != stable:
                # A fallback, a restore or a new stable: what was seen before (here, or on
                # another replica's side of the fallback) says nothing about the stable now.
                self._reset(address)
                self._stable_judged[adapter] = stable
            if view.in_fallback:
                return  # a request started before the fallback: it judges nothing now
            if not view.auto_fallback:
                self._monitor.record(key, limits, **sample.fields())  # a possible target
                return
            verdict = self._monitor.observe(key, limits, **sample.fields())
            if verdict is not None:
                self._spawn(self._take_backs.take_back(view, version, verdict, stable=True))
        else:
            self._monitor.record(key, limits, **sample.fields())

    def role_tag(self, adapter: str, version: int | None) -> int:
        """A 32-bit digest of the role `adapter@version` serves in now (`judged_role`: a canary's
        start, a stable's fallbacks and restores), signed into each response's id; 0 for
        a version in no rollout role. Every replica computes the same from the same view."""
        if not adapter or version is None:
            return 0
        view = self._router.view(adapter)
        if view is None:
            return 0
        if version == view.canary_version:
            role: tuple[object, ...] = ("canary", *judged_role(view, stable=False))
        elif version == view.stable_version:
            role = ("stable", *judged_role(view, stable=True))
        else:
            return 0
        digest = hashlib.blake2b(repr(role).encode(), digest_size=4).digest()
        return int.from_bytes(digest, "big") or 1

    def feedback(
        self,
        adapter: str,
        version: int | None,
        outcome: Outcome,
        response_id: str,
        *,
        judged: bool,
        role_tag: int,
    ) -> None:
        """One caller's verdict on a response `adapter@version` served. Judges only a canary or
        an armed stable, on feedback from the requests that judge it (`judged`, as in
        `observe`): a tenant an adapter is shared with could otherwise roll back its owner's
        version. Only feedback on responses served in the version's current role counts
        (`role_tag`): a report, or a client's late resend, about a canary before its restart or
        a stable before its restore must not take the new one back."""
        judging = self._judging("outcomes", adapter, version, judged=judged, role_tag=role_tag)
        if judging is None:
            return
        key, limits = judging.key, judging.limits
        verdict: Verdict | None
        if outcome is Outcome.SAFETY_INCIDENT:
            verdict = safety_verdict(response_id)
        elif outcome in TASK_OUTCOMES:
            figures = self._outcomes.record(key, TASK_OUTCOMES[outcome], limits.window)
            if not self._outcomes.full(key):
                return
            verdict = judge_task_success(figures, limits.min_task_success)
        else:
            return
        self._act(judging, verdict)

    def tool_call(
        self, adapter: str, version: int | None, valid: bool, *, judged: bool, role_tag: int
    ) -> None:
        """One call `adapter@version` wrote under tool_choice "auto", valid or not
        (gateway.services.tool_call_checks). Judged as feedback is: a canary or an armed stable,
        on its owner's routed requests, in the role the request was served in; a full window
        under `min_tool_call_validity` takes it back (reason tool_calls)."""
        judging = self._judging("tool_calls", adapter, version, judged=judged, role_tag=role_tag)
        if judging is None:
            return
        calls, validity = self._outcomes.share(judging.key, valid, judging.limits.window)
        if self._outcomes.full(judging.key):
            figures = ToolCallFigures(calls, validity)
            self._act(judging, judge_tool_calls(figures, judging.limits.min_tool_call_validity))

    def _judging(
        self, kind: str, adapter: str, version: int | None, *, judged: bool, role_tag: int
    ) -> Judging | None:
        """Where evidence of `kind` about `adapter@version` in the role `role_tag` names goes,
        when it may act: the owner's routed requests (`judged`) about a canary, or an armed
        stable not in fallback; None otherwise (counted in metrics only)."""
        if not judged or version is None or not adapter:
            return None
        view = self._router.view(adapter)
        if view is None or role_tag == 0 or role_tag != self.role_tag(adapter, version):
            return None
        if version == view.canary_version:
            stable = False
        elif version == view.stable_version and view.auto_fallback and not view.in_fallback:
            stable = True
        else:
            return None  # nothing to take it back from
        key = (kind, served_address(adapter, version), judged_role(view, stable=stable))
        return Judging(view, version, stable, key, self._limits(view, version))

    def _act(self, judging: Judging, verdict: Verdict | None) -> None:
        if verdict is None:
            return
        self._outcomes.reset(judging.key)  # the next verdict needs a whole new window
        take_back = self._take_backs.take_back(
            judging.view, judging.version, verdict, stable=judging.stable
        )
        self._spawn(take_back)

    def _reset(self, key: str) -> None:
        """Empty both windows of `key`: its owner's, and every caller's errors."""
        self._monitor.reset(key)
        self._monitor.reset(errors_key(key))

    def record_shadow(self, adapter: str, version: int, sample: Sample) -> None:
        """One mirrored request to a shadow candidate: into its shadow window (never the
        window of the version's own traffic: a mirror that ends after the candidate became the
        canary must not judge the canary), no verdict."""
        limits = self._limits(self._router.view(adapter), version)
        self._monitor.record(shadow_key(adapter, version), limits, **sample.fields())

    def figures(self, adapter: str, version: int, *, shadow: bool = False) -> WindowFigures | None:
        """This replica's window of `adapter@version`'s traffic, or (shadow=True) of the
        copies mirrored to it; None: nothing recorded yet."""
        key = shadow_key(adapter, version) if shadow else served_address(adapter, version)
        return self._monitor.figures(key)

    def _limits(self, view: RolloutView | None, version: int | None) -> WindowLimits:
        thresholds = self._defaults
        if view is not None and version is not None:
            thresholds = view.thresholds(version, self._defaults)
        fields = asdict(thresholds)
        fields["max_error_rate"] = min(fields["max_error_rate"], 0.999)
        return WindowLimits(**fields)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `work` in the background, where `close` cancels it; the task is returned so
        that TakeBacks can tell a retry still running from one that ended."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def failing_addresses(self) -> set[str]:
        """Every served address whose recent requests breach its thresholds: never a target."""
        failing = set()
        for key in self._monitor.addresses():
            address = key[1] if isinstance(key, tuple) and key[0] == "errors" else key
            if not isinstance(address, str):
                continue  # a shadow's window: mirrored copies serve nobody
            name, _, number = address.partition("@")
            view = self._router.view(name) if number else None
            version = int(number) if number.isdigit() else None
            if self._monitor.failing(key, self._limits(view, version)):
                failing.add(address)
        return failing

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
