"""The engine's settings: vLLM's limits, structured outputs, the output parsers, the loop
guard and the paged adapter pool. Fields of the one Settings (gateway.settings), which takes
them from here as a base class, read from `LORAPLEX_*` variables like every other."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from gateway.engine.client import LoopGuard
from gateway.schemas.loop_guard import MAX_LOOP_COUNT, MAX_LOOP_PATTERN, check_loop_work
from kernels.vllm_plugin import (
    DEFAULT_KERNEL,
    DEFAULT_MAX_OVERSUBSCRIPTION,
    DEFAULT_MAX_SKIP_MS,
    DEFAULT_MAX_WAIT_MS,
    DEFAULT_PAGE_SIZE,
    DEFAULT_POLICY,
)

# vLLM 0.32 preallocates LoRA buffers for these ranks only.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class EngineSettings(BaseModel):
    """The fields and checks of the engine's settings (vLLM AsyncLLM, embedded)."""

    max_loras: int = Field(4, ge=1, description="Adapters that can share one batch.")
    max_lora_rank: int = Field(32, description=f"One of {VLLM_LORA_RANKS}.")
    adapter_cache_bytes: int = Field(
        2 * 1024**3,
        gt=0,
        description="Host-memory budget for loaded adapters (LRU by bytes, in-use pinned).",
    )
    max_cpu_loras: int = Field(
        256,
        ge=1,
        description="vLLM's own count ceiling on host-cached adapters; the gateway's cache keeps "
        "within it as well as within adapter_cache_bytes.",
    )
    max_model_len: int = Field(1024, ge=16)
    max_num_seqs: int = Field(64, ge=1)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # On CPU vLLM reads this as the share of host memory it reserves; None picks 0.2 on CPU
    # (a small node leaves no room for 0.9) and 0.9 on CUDA.
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    enforce_eager: bool = False
    seed: int = 0
    # Structured outputs (response_format, structured_outputs, forced tool calls): one grammar
    # backend. Not vLLM's "auto": its front end picks a backend per request, but the engine core
    # builds only the first request's and compiles every later constraint with it, which
    # silently dropped keywords one backend cannot enforce, or failed every later request.
    structured_outputs_backend: Literal["xgrammar", "guidance"] = Field(
        "xgrammar",
        description="vLLM's grammar backend; a constraint it cannot enforce is a 400.",
    )
    structured_outputs_compact_json: bool = Field(
        False,
        description="JSON outputs without free whitespace between tokens (a small or weak "
        "model can otherwise pad JSON with whitespace up to max_tokens).",
    )
    # tool_choice "auto" (the default with tools): vLLM's parser for the model's own call
    # syntax (vLLM's --tool-call-parser names: hermes, llama3_json, mistral, pythonic, ...).
    # None: such requests are refused; forced calls ("required", named) need no parser.
    tool_call_parser: str | None = Field(
        None,
        min_length=1,
        description="vLLM tool-call parser for tool_choice 'auto'; unset refuses 'auto'.",
    )
    # Reasoning models: vLLM's parser for the model's reasoning markup (vLLM's
    # --reasoning-parser names: deepseek_r1, qwen3, ...). Chat outputs then come back split
    # into reasoning and content, and structured outputs constrain only the content.
    reasoning_parser: str | None = Field(
        None,
        min_length=1,
        description="vLLM reasoning parser: chat responses carry the reasoning apart.",
    )
    # Loop guard (gateway.schemas.loop_guard): an output repeating one n-gram of up to
    # loop_guard_max_pattern tokens loop_guard_min_count times in a row ends with
    # finish_reason "repetition". Off (0) by default: a table or a list repeats by design.
    loop_guard_max_pattern: int = Field(
        0, ge=0, le=MAX_LOOP_PATTERN, description="Longest repeated n-gram in tokens; 0 = off."
    )
    loop_guard_min_count: int = Field(8, ge=2, le=MAX_LOOP_COUNT)
    engine_start_timeout_s: float = Field(600, gt=0)

    # Paged adapter pool inside vLLM (kernels/README.md): adapter weights live in pages bounded
    # by bytes, so a slot costs a page-table row and capacity is Σ ⌈rank / page⌉ pages instead
    # of max_loras x max_lora_rank. Exported as LORAPLEX_PAGED_* to the engine's processes.
    paged_lora: bool = Field(
        False, description="Paged adapter pool with residency-aware admission."
    )
    paged_pool_bytes: int | None = Field(
        None, gt=0, description="The pool's size in bytes, every paged layer together."
    )
    paged_page_size: int = Field(DEFAULT_PAGE_SIZE, gt=0, description="Rank rows per page.")
    paged_max_wait_ms: int = Field(
        DEFAULT_MAX_WAIT_MS,
        gt=0,
        description="Admission's bounded wait: an older request goes first, and no new adapter "
        "is admitted ahead of it.",
    )
    paged_policy: Literal["hold", "rotate"] = Field(
        DEFAULT_POLICY,
        description="rotate: running requests may sit out steps so pages are shared between "
        "steps; hold: a new adapter waits for a running one's pages.",
    )
    paged_max_skip_ms: int = Field(
        DEFAULT_MAX_SKIP_MS, gt=0, description="rotate: the longest a running request sits out."
    )
    paged_max_oversubscription: float = Field(
        DEFAULT_MAX_OVERSUBSCRIPTION,
        ge=1,
        allow_inf_nan=False,
        description="rotate: a new adapter starts only while the running adapters' pages stay "
        "within this many times the pool.",
    )
    paged_split: Literal["demand", "equal"] = Field(
        "demand",
        description="demand: the pool's bytes are split between layer groups (q/k/v, o, "
        "gate/up, down) by what the registered adapters would take in each, read at start; "
        "equal: the same pages in every group.",
    )
    paged_kernel: Literal["auto", "torch", "triton"] = Field(
        DEFAULT_KERNEL,
        description="auto: SGMV Triton kernels on CUDA, the torch path on CPU; triton on CPU "
        "needs TRITON_INTERPRET=1 (tests only).",
    )

    @field_validator("max_lora_rank")
    @classmethod
    def _supported_rank(cls, value: int) -> int:
        if value not in VLLM_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {VLLM_LORA_RANKS}, got {value}")
        return value

    @model_validator(mode="after")
    def _loop_guard_bounded(self) -> EngineSettings:
        if self.loop_guard_max_pattern:
            check_loop_work(self.loop_guard_max_pattern, self.loop_guard_min_count)
        return self

    def loop_guard(self) -> LoopGuard | None:
        """The deployment's loop guard for requests that send none; None when off."""
        if self.loop_guard_max_pattern == 0:
            return None
        return LoopGuard(self.loop_guard_max_pattern, 0, self.loop_guard_min_count)

    @model_validator(mode="after")
    def _paged_pool_sized(self) -> EngineSettings:
        if self.paged_lora and self.paged_pool_bytes is None:
            raise ValueError("paged_lora needs paged_pool_bytes (LORAPLEX_PAGED_POOL_BYTES)")
        return self
