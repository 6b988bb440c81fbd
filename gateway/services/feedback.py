"""Callers' verdicts on responses they were served: counted per adapter version
(`loraplex_feedback_total`) and handed to the rollout controller, which rolls a canary back on
a safety incident or on task success under its minimum (gateway/outcome_monitor.py).

The response id is the receipt (gateway/feedback_ids.py): no table of served requests, nothing
written per request. One verdict per response: the first one recorded is kept in the registry
(by the sha256 of the id), where every replica sharing it finds it, and survives restarts; the
same verdict again is a duplicate (a client's retry, to any replica), another one a conflict.
So a client cannot count one response twice by sending it to two replicas, or fill a rollback
window with one response's verdict. Each replica remembers the verdicts it has seen, so a retry
to the same replica costs no round trip.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from gateway.audit_log import audit_event
from gateway.errors import LoraplexError
from gateway.feedback_ids import ResponseIds
from gateway.metrics import FEEDBACK
from gateway.outcome_monitor import Outcome
from gateway.registry_runtime import RegistryRuntime
from gateway.request_metrics import MetricScope
from gateway.rollout_controller import RolloutController
from gateway.schemas.feedback import FeedbackRecorded, FeedbackRequest
from registry import service
from registry.service import Principal

logger = logging.getLogger(__name__)
# Verdicts a replica remembers, oldest forgotten first (the registry keeps them all).
MAX_REMEMBERED = 100_000
# How often a replica deletes the registry's verdicts past the feedback window, and how long
# past it (replicas' clocks may differ): a verdict is kept while its response can be judged.
PRUNE_EVERY_S = 3600.0
PRUNE_RETRY_S = 60.0
PRUNE_MARGIN_S = 3600.0
# Version row id -> (adapter name, version number): immutable, so cached for good (bounded).
MAX_ADDRESSES = 10_000


class ResponseNotFound(LoraplexError):
    """Unknown, forged, another tenant's, or signed by another secret: one answer for all."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "response_not_found"

    def __init__(self) -> None:
        super().__init__(
            "No response with this id was served to this API key's tenant by this gateway.",
            param="id",
        )


class FeedbackExpired(LoraplexError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "feedback_expired"


class FeedbackConflict(LoraplexError):
    status_code = 409
    error_type = "invalid_request_error"
    code = "feedback_conflict"


class FeedbackService:
    def __init__(
        self,
        ids: ResponseIds,
        registry: RegistryRuntime,
        controller: RolloutController | None,
        base_name: str,
        max_age_s: float,
        clock: Callable[[], float] = time.time,
    ):
        self._ids = ids
        self._registry = registry
        self._controller = controller
        self._base_name = base_name
        self._max_age_s = max_age_s
        self._clock = clock
        self._recorded: OrderedDict[str, Outcome] = OrderedDict()
        self._addresses: OrderedDict[int, tuple[str, int]] = OrderedDict()
        self._next_prune = 0.0  # time.monotonic() reading

    async def record(
        self,
        body: FeedbackRequest,
        caller: Principal,
        *,
        note_scope: Callable[[MetricScope], None] | None = None,
    ) -> FeedbackRecorded:
        """`note_scope` hears the version the response came from once it is known, so that the
        request metrics count this call there, not as base-model traffic."""
        receipt = self._ids.read(body.id, tenant_id=caller.tenant_id)
        if receipt is None:
            raise ResponseNotFound()
        if self._clock() - receipt.issued_at > self._max_age_s:
            raise FeedbackExpired(
                f"Feedback is accepted for {self._max_age_s:.0f} s after a response.", param="id"
            )
        if receipt.version_id is None:
            adapter, version = "", None
        else:
            adapter, version = await self._address(receipt.version_id)
        model = adapter or self._base_name
        version_label = "" if version is None else str(version)
        if note_scope is not None:
            note_scope(MetricScope(caller.tenant, adapter, version_label))
        previous = self._recorded.get(body.id)
        if previous is None:
            previous = await self._record_first(body.id, body.outcome)
            self._remember(body.id, body.outcome if previous is None else previous)
        if previous is not None:
            if previous != body.outcome:
                raise FeedbackConflict(
                    f"This response already has the verdict {previous.value!r}.", param="outcome"
                )
            return FeedbackRecorded(id=body.id, outcome=body.outcome, model=model, duplicate=True)
        FEEDBACK.labels(caller.tenant, adapter, version_label, body.outcome.value).inc()
        if body.outcome is Outcome.SAFETY_INCIDENT:
            audit_event(
                "safety_incident",
                tenant=caller.tenant,
                key_id=caller.key_id,
                model=model,
                version=version_label or None,
                response_id=body.id,
            )
        if self._controller is not None:
            self._controller.feedback(
                adapter,
                version,
                body.outcome,
                body.id,
                judged=receipt.judged,
                role_tag=receipt.role_tag,
            )
        return FeedbackRecorded(id=body.id, outcome=body.outcome, model=model, duplicate=False)

    async def _record_first(self, response_id: str, outcome: Outcome) -> Outcome | None:
        """Record the verdict in the registry unless one is there: None when this call recorded
        it, else the one recorded first. An unreachable registry raises (a 503: the client
        retries, and nothing was counted)."""
        now = datetime.fromtimestamp(self._clock(), UTC)
        await self._prune_if_due(now)
        key = hashlib.sha256(response_id.encode()).hexdigest()
        token = secrets.token_hex(16)
        try:
            async with self._registry.sessions() as session:
                recorded = await service.record_verdict(
                    session, response_sha256=key, outcome=outcome.value, at=now, token=token
                )
        except Exception:
            # The commit may have gone through with its answer lost (a timeout waiting on a
            # synchronous standby, a connection cut after it): the client's retry would then
            # find the row and count nothing, ever. Ask once more before answering 503.
            found = await self._verdict_of(key)
            if found is None:
                raise
            recorded = None if found[1] == token else found[0]
        if recorded is None:
            return None
        try:
            return Outcome(recorded)
        except ValueError:  # recorded by a newer gateway, which knows more outcomes
            raise FeedbackConflict(
                f"This response already has the verdict {recorded!r}.", param="outcome"
            ) from None

    async def _verdict_of(self, key: str) -> tuple[str, str] | None:
        try:
            async with self._registry.sessions() as session:
                return await service.verdict_of(session, response_sha256=key)
        except Exception:
            logger.debug("could not read verdict %s back", key[:12], exc_info=True)
            return None

    async def _prune_if_due(self, now: datetime) -> None:
        """Delete the registry's verdicts past the feedback window, at most once an hour per
        replica (one at a time), in a session of its own: a failed prune is retried a minute
        later and never fails the verdict being recorded."""
        if time.monotonic() < self._next_prune:
            return
        self._next_prune = time.monotonic() + PRUNE_EVERY_S
        window = timedelta(seconds=self._max_age_s + PRUNE_MARGIN_S)
        try:
            async with self._registry.sessions() as session:
                pruned = await service.prune_verdicts(session, recorded_before=now - window)
        except Exception:
            self._next_prune = time.monotonic() + PRUNE_RETRY_S
            logger.warning("could not prune feedback verdicts", exc_info=True)
            return
        if pruned:
            logger.info("pruned %d feedback verdicts past the feedback window", pruned)

    async def _address(self, version_id: int) -> tuple[str, int]:
        cached = self._addresses.get(version_id)
        if cached is not None:
            return cached
        async with self._registry.sessions() as session:
            found = await service.version_address(session, version_id=version_id)
        if found is None:  # signed by this gateway's secret for a row that never existed
            logger.error("a valid receipt names version row %d, which does not exist", version_id)
            raise ResponseNotFound()
        self._addresses[version_id] = found
        while len(self._addresses) > MAX_ADDRESSES:
            self._addresses.popitem(last=False)
        return found

    def _remember(self, response_id: str, outcome: Outcome) -> None:
        self._recorded[response_id] = outcome
        while len(self._recorded) > MAX_REMEMBERED:
            self._recorded.popitem(last=False)
