"""Paged mode's settings, read from LORAPLEX_PAGED_* by `kernels.vllm_plugin` and handed to
`kernels.paged_worker.install` (no vLLM import: the plugin parses them before vLLM loads)."""

from __future__ import annotations

from dataclasses import dataclass

from kernels.page_groups import DemandEntry


@dataclass(frozen=True)
class PagedLoraConfig:
    """Paged mode's settings (from LORAPLEX_PAGED_* in `kernels.vllm_plugin.register`)."""

    pool_bytes: int
    page_size: int = 4
    # Residency-aware admission in the scheduler (kernels.paged_scheduler). Off only to test
    # the worker's own refusal (PoolExhausted) when a batch does not fit.
    admission: bool = True
    max_wait_s: float = 10.0  # bounded waiting: older requests are admitted first
    # "hold": a new adapter waits until running ones free pages (kernels.paged_admission);
    # "rotate": running requests may sit out steps so pages are shared (kernels.paged_rotation)
    policy: str = "rotate"
    max_skip_s: float = 0.2  # rotate: a running request sits out at most about this long
    # rotate: running adapters' pages stay within this x the pool (kernels.paged_rotation)
    max_oversubscription: float = 2.0
    # auto: Triton on CUDA, the torch path on CPU (kernels.paged_lora_layers.resolve_kernel)
    kernel: str = "auto"
    # the registered adapters' ranks and modules: how the budget is split between layer groups
    demand: tuple[DemandEntry, ...] = ()
