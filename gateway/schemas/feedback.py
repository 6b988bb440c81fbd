"""POST /v1/feedback: a caller's verdict on one response it was served."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.outcome_monitor import Outcome

# An id this gateway issues is about 90 characters; anything much longer is not one.
MAX_ID_CHARS = 200


class FeedbackRequest(BaseModel):
    """Unknown fields are refused: free text (a comment, the prompt) is never stored, and a
    misspelt field must not pass as feedback without it."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"id": "chatcmpl-…", "outcome": "success"}]},
    )

    id: str = Field(
        min_length=1,
        max_length=MAX_ID_CHARS,
        description="The `id` of the chat completion or completion the verdict is about.",
    )
    outcome: Outcome = Field(
        description="success / failure (task success), human_override, user_correction, "
        "schema_failure, false_refusal, or safety_incident (rolls a canary back at once)."
    )


class FeedbackRecorded(BaseModel):
    object: Literal["feedback"] = "feedback"
    id: str
    outcome: Outcome
    model: str = Field(description="The adapter (or base model) that served the response.")
    duplicate: bool = Field(
        description="True when this verdict on this response was already recorded here: "
        "counted once."
    )
