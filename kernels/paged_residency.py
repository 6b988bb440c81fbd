"""Which adapters hold pages of the paged LoRA pool: a plain state machine, no tensors, no I/O.

Every paged layer has its own `PagedLoraPool` with the same number of pages N, and an adapter
of rank r takes ceil(r / P) pages in each layer it adapts (fewer, or none, in layers it does
not). Accounting one adapter as ceil(max layer rank / P) pages against a single budget of N
therefore guarantees that whatever this ledger admits fits every layer's pool.

The driver (`kernels.paged_lora_manager`) asks `plan_admit` before copying an adapter in,
pages out the victims it returns, copies, then records the result with `admit`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection


class PoolExhausted(RuntimeError):
    """The adapters of the running batch do not fit the pool together: nothing is served.

    Raised instead of serving wrong weights. Until residency-aware admission exists (issue 9
    requirement 3) the scheduler only bounds the *number* of adapters per batch (max_loras),
    so the budget must hold the largest max_loras adapters that may share a batch.
    """


class AdapterTooLarge(PoolExhausted):
    """One adapter alone needs more pages than the whole pool has."""


class Residency:
    """Pages held per resident adapter, in least-recently-used order."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        assert num_pages >= 0 and page_size > 0, f"bad pool {num_pages} x {page_size}"
        self.num_pages = num_pages
        self.page_size = page_size
        self._pages: OrderedDict[int, int] = OrderedDict()  # adapter id -> pages, LRU first

    def pages_for_rank(self, rank: int) -> int:
        return -(-rank // self.page_size)

    @property
    def pages_used(self) -> int:
        return sum(self._pages.values())

    @property
    def pages_free(self) -> int:
        return self.num_pages - self.pages_used

    def resident(self) -> list[int]:
        """Resident adapter ids, least recently used first."""
        return list(self._pages)

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._pages

    def touch(self, adapter_id: int) -> None:
        if adapter_id in self._pages:
            self._pages.move_to_end(adapter_id)

    def plan_admit(self, adapter_id: int, pages: int, protected: Collection[int]) -> list[int]:
        """Adapters to page out (LRU first, never one in `protected`) so `pages` fit.

        Raises AdapterTooLarge if the pool could never hold it, PoolExhausted if only paging
        out protected adapters (the running batch) would make room.
        """
        if pages > self.num_pages:
            raise AdapterTooLarge(
                f"adapter {adapter_id} needs {pages} pages of {self.page_size} rank rows, "
                f"the pool has {self.num_pages}: raise LORAPLEX_PAGED_POOL_BYTES"
            )
        held = self._pages.get(adapter_id, 0)  # reloading in place frees its own pages first
        free = self.pages_free + held
        victims: list[int] = []
        for other, other_pages in self._pages.items():
            if free >= pages:
                break
            if other == adapter_id or other in protected:
                continue
            victims.append(other)
            free += other_pages
        if free < pages:
            in_batch = {a: p for a, p in self._pages.items() if a in protected}
            raise PoolExhausted(
                f"adapter {adapter_id} needs {pages} pages, {free} can be freed without "
                f"evicting the running batch (pages held by it: {in_batch}; pool "
                f"{self.num_pages} pages of {self.page_size} rank rows): raise "
                "LORAPLEX_PAGED_POOL_BYTES or lower max_loras"
            )
        return victims

    def admit(self, adapter_id: int, pages: int) -> None:
        """Record `adapter_id` as holding `pages` (most recently used)."""
        self._pages.pop(adapter_id, None)
        assert pages <= self.pages_free, f"admit {pages} pages, {self.pages_free} free"
        self._pages[adapter_id] = pages

    def release(self, adapter_id: int) -> int:
        """Forget `adapter_id`; returns the pages it held (0 if it held none)."""
        return self._pages.pop(adapter_id, 0)

    def clear(self) -> None:
        self._pages.clear()
