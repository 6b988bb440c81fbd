"""POST /v1/feedback (gateway/services/feedback.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from gateway.auth import TenantDep
from gateway.errors import EngineUnavailable
from gateway.request_metrics import note_scope
from gateway.schemas.feedback import FeedbackRecorded, FeedbackRequest
from gateway.services.feedback import FeedbackService

router = APIRouter(prefix="/v1", tags=["feedback"])


async def _feedback(request: Request) -> FeedbackService:
    # async: a plain def dependency costs a thread-pool hop per request (gateway/deps.py)
    feedback: FeedbackService | None = getattr(request.app.state, "feedback", None)
    if feedback is None:
        raise EngineUnavailable("The gateway is starting; try again shortly.")
    return feedback


@router.post("/feedback")
async def record_feedback(
    body: FeedbackRequest,
    request: Request,
    caller: TenantDep,
    feedback: Annotated[FeedbackService, Depends(_feedback)],
) -> FeedbackRecorded:
    """Record a verdict on a response this key's tenant was served, named by its `id`: counted
    for the adapter version that served it; a safety incident, or task success below the
    version's minimum over a window, rolls a canary back (an armed stable falls back)."""
    return await feedback.record(
        body, caller, note_scope=lambda scope: note_scope(request.state, scope)
    )
