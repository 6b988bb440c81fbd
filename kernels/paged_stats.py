"""Engine-side counters of the paged LoRA pool, as plain Python (no metrics library here).

The gateway owns metric objects (prefix `loraplex_`); it reads a `snapshot()` from the engine
process with `await engine.collective_rpc("loraplex_paged_pool_stats")` (one entry per worker;
the plugin adds that method to vLLM's worker wrapper, see `WORKER_METHODS`) and exports it.
Counters (`*_total`) only grow; the others describe the pool now.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class PagedPoolStats:
    """One engine's pool. A page is `page_size` rank rows of one layer group
    (kernels.page_groups); page counts are summed over the groups, bytes are exact."""

    page_size: int = 0
    pages_total: int = 0
    pages_used: int = 0
    bytes_per_page: int = 0  # one page in every paged layer at once (all groups together)
    bytes_total: int = 0  # the pool's weight memory, all groups
    bytes_used: int = 0  # held by resident adapters
    slots_total: int = 0
    adapters_resident: int = 0
    # Adapters copied into the pool / dropped from it (whatever the reason).
    page_ins_total: int = 0
    page_outs_total: int = 0
    # Pages allocated / freed by those events (one page id per layer counts once).
    pages_in_total: int = 0
    pages_out_total: int = 0
    # Bytes copied host -> pool by page-ins, counted per layer as really copied.
    bytes_in_total: int = 0
    # Page-outs forced by a page-in that did not fit (LRU adapters outside the running batch).
    evictions_for_space_total: int = 0
    # Activations refused because the pool could not hold the adapter (engine fails loudly).
    refusals_total: int = 0
    # Adapters paged in ahead of their requests (vLLM's add_lora, sent by the gateway when it
    # admits a request for an adapter), and prefetches skipped for lack of free pages or slots.
    prefetches_total: int = 0
    prefetches_skipped_total: int = 0
    vocab_layers_unwrapped: int = 0  # embedding / lm_head LoRA wrappers put back to base
    # Per layer group (kernels.page_groups): {"total": pages, "used": pages}. The sums above
    # add pages of different sizes; which group is full is what an operator acts on.
    group_pages: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def pages_free(self) -> int:
        return self.pages_total - self.pages_used

    def snapshot(self) -> dict[str, Any]:
        """Plain dict (picklable across vLLM's RPC), `pages_free` included."""
        out = asdict(self)
        out["pages_free"] = self.pages_free
        return out


def _adapter_manager(worker: Any) -> Any:
    """vLLM's LoRAModelManager in this worker (None without LoRA); `worker` is what
    collective_rpc passes: the worker wrapper, which forwards attributes to the worker."""
    runner = getattr(worker, "model_runner", None)
    return getattr(getattr(runner, "lora_manager", None), "_adapter_manager", None)


def paged_pool_stats(worker: Any) -> dict[str, Any] | None:
    """The pool's counters in this worker; None when paged mode is off."""
    stats = getattr(_adapter_manager(worker), "stats", None)
    return stats.snapshot() if isinstance(stats, PagedPoolStats) else None


def paged_pool_groups(worker: Any) -> dict[str, Any] | None:
    """The pool's layer groups and their pages (kernels.page_groups.PoolGroups.to_dict), for
    the scheduler's admission; None when paged mode is off."""
    groups = getattr(_adapter_manager(worker), "pool_groups", None)
    return groups.to_dict() if groups is not None else None


def paged_layers(worker: Any) -> dict[str, str]:
    """LoRA layer name -> class name for every layer whose weights are paged."""
    manager = _adapter_manager(worker)
    modules = getattr(manager, "modules", {})
    return {name: type(m).__name__ for name, m in modules.items() if hasattr(m, "paged_geometry")}


def paged_kernels(worker: Any) -> dict[str, str]:
    """LoRA layer name -> the kernel its delta runs ("triton" or "torch"), paged layers only."""
    manager = _adapter_manager(worker)
    modules = getattr(manager, "modules", {})
    return {name: m.paged_kernel for name, m in modules.items() if hasattr(m, "paged_kernel")}


# Installed on vLLM's WorkerWrapperBase by the plugin, so collective_rpc can name them.
WORKER_METHODS: dict[str, Callable[[Any], Any]] = {
    "loraplex_paged_pool_stats": paged_pool_stats,
    "loraplex_paged_pool_groups": paged_pool_groups,
    "loraplex_paged_layers": paged_layers,
    "loraplex_paged_kernels": paged_kernels,
}
