"""The loop guard on the wire: vLLM's `repetition_detection` request extension.

An output that repeats the same token n-gram `min_count` times in a row is ended with
finish_reason "repetition" instead of running to max_tokens: a looping adapter would otherwise
spend a batch slot and the tenant's token budget on nothing. Bounded tighter than vLLM bounds
it: the engine core checks every running sequence after every step, in Python, for patterns of
every size up to the largest, comparing up to Σ size x (min_count - 1) tokens (measured: 0.4-1.1
ms per sequence and step at 64/64 on an output built to defeat it, 46 us at 16/16), work that
every tenant's steps wait for.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from gateway.engine.client import LoopGuard

MAX_LOOP_PATTERN = 64  # tokens in the longest repeated n-gram looked for
MAX_LOOP_COUNT = 64  # repeats in a row
# Tokens compared per sequence and step at worst, Σ_{size ≤ max} size x (min_count - 1): 16/16
# (the measured 46 us) is 2040; 32/4 is 1584, 8/32 is 1116.
MAX_LOOP_WORK = 2048


def loop_work(max_pattern: int, min_count: int) -> int:
    return max_pattern * (max_pattern + 1) // 2 * (min_count - 1)


def check_loop_work(max_pattern: int, min_count: int) -> None:
    work = loop_work(max_pattern, min_count)
    if work > MAX_LOOP_WORK:
        raise PydanticCustomError(
            "loop_guard_work",
            "max_pattern_size {size} with min_count {count} compares up to {work} tokens per "
            "sequence and engine step; at most {limit} (e.g. 16 and 16, or 32 and 4).",
            {"size": max_pattern, "count": min_count, "work": work, "limit": MAX_LOOP_WORK},
        )


class RepetitionDetection(BaseModel):
    """vLLM's spelling; max_pattern_size 0 turns the guard off for this request (a deployment's
    included: the tenant pays for its tokens either way, and a constrained output that must
    repeat, such as `a{100}`, would otherwise be cut)."""

    model_config = ConfigDict(extra="forbid")

    max_pattern_size: int = Field(ge=0, le=MAX_LOOP_PATTERN)
    min_pattern_size: int = Field(0, ge=0, le=MAX_LOOP_PATTERN)  # 0: from one token
    min_count: int = Field(0, ge=0, le=MAX_LOOP_COUNT)

    @model_validator(mode="after")
    def _a_guard_or_off(self) -> RepetitionDetection:
        if self.max_pattern_size == 0:
            return self
        if self.min_count < 2:
            raise PydanticCustomError(
                "min_count", "min_count must be at least 2 when max_pattern_size is set."
            )
        if self.min_pattern_size > self.max_pattern_size:
            raise PydanticCustomError(
                "pattern_sizes", "min_pattern_size must be at most max_pattern_size."
            )
        check_loop_work(self.max_pattern_size, self.min_count)
        return self

    def guard(self) -> LoopGuard | None:
        if self.max_pattern_size == 0:
            return None
        return LoopGuard(self.max_pattern_size, self.min_pattern_size, self.min_count)
