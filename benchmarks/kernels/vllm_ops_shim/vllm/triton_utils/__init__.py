"""vLLM re-exports Triton from here; the ops need `triton` and `tl` only."""

import triton
import triton.language as tl

__all__ = ["tl", "triton"]
