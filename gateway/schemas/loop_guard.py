"""The loop guard on the wire: vLLM's `repetition_detection` request extension.

An output that repeats the same token n-gram `min_count` times in a row is ended with
finish_reason "repetition" instead of running to max_tokens: a looping adapter would otherwise
spend a batch slot and the tenant's token budget on nothing. Bounded tighter than vLLM bounds
it: the engine core checks every running sequence after every step, in Python, for patterns of
every size up to the largest, so the work per step grows with both numbers.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from gateway.engine.client import LoopGuard

MAX_LOOP_PATTERN = 64  # tokens in the longest repeated n-gram looked for
MAX_LOOP_COUNT = 64  # repeats in a row


class RepetitionDetection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_pattern_size: int = Field(ge=1, le=MAX_LOOP_PATTERN)
    min_pattern_size: int = Field(0, ge=0, le=MAX_LOOP_PATTERN)  # 0: from one token
    min_count: int = Field(ge=2, le=MAX_LOOP_COUNT)

    @model_validator(mode="after")
    def _sizes_in_order(self) -> RepetitionDetection:
        if self.min_pattern_size > self.max_pattern_size:
            raise PydanticCustomError(
                "pattern_sizes", "min_pattern_size must be at most max_pattern_size."
            )
        return self

    def guard(self) -> LoopGuard:
        return LoopGuard(self.max_pattern_size, self.min_pattern_size, self.min_count)
