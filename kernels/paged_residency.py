"""Which adapters hold pages of the paged LoRA pool: a plain state machine, no tensors, no I/O.

Every paged layer has its own `PagedLoraPool`; the layers of one kind form a group with the
same number of pages and one ledger here (kernels.page_groups). An adapter of rank r takes
ceil(r / P) pages in each layer it adapts and none in the others, so it is charged, per group,
ceil(its widest rank in that group's layers / P) pages. What this ledger admits therefore fits
every layer's pool.

Pages are vectors, one entry per group (`kernels.page_groups.Pages`); a ledger made with a
plain page count has one group.

The driver (`kernels.paged_lora_manager`) asks `plan_admit` before copying an adapter in,
pages out the victims it returns, copies, then records the result with `admit`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Sequence

from kernels.page_groups import Pages, as_pages, pages_add, pages_fit, pages_for_rank


class PoolExhausted(RuntimeError):
    """The adapters of the running batch do not fit the pool together: nothing is served.

    Raised instead of serving wrong weights. The scheduler's residency-aware admission keeps
    batches within the pool; this is the worker's own check behind it.
    """


class AdapterTooLarge(PoolExhausted):
    """One adapter alone needs more pages than the whole pool has (in some group)."""


class Residency:
    """Pages held per resident adapter, in least-recently-used order."""

    def __init__(
        self, num_pages: int | Sequence[int], page_size: int, names: Sequence[str] = ()
    ) -> None:
        totals = as_pages(num_pages)
        assert all(n >= 0 for n in totals) and page_size > 0, f"bad pool {totals} x {page_size}"
        self.totals: Pages = totals
        self.page_size = page_size
        self.names = tuple(names) or tuple(f"group{i}" for i in range(len(totals)))
        assert len(self.names) == len(totals), "one name per group"
        self._zero: Pages = (0,) * len(totals)
        self._pages: OrderedDict[int, Pages] = OrderedDict()  # adapter id -> pages, LRU first

    @property
    def num_pages(self) -> int:
        """Pages of every group together."""
        return sum(self.totals)

    def pages_for_rank(self, rank: int) -> int:
        return pages_for_rank(rank, self.page_size)

    @property
    def used(self) -> Pages:
        used = self._zero
        for pages in self._pages.values():
            used = pages_add(used, pages)
        return used

    @property
    def pages_used(self) -> int:
        return sum(self.used)

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

    def _describe(self, pages: Pages) -> str:
        if len(pages) == 1:
            return f"{pages[0]} pages"
        return ", ".join(f"{n} {name}" for n, name in zip(pages, self.names, strict=True))

    def plan_admit(
        self, adapter_id: int, pages: int | Sequence[int], protected: Collection[int]
    ) -> list[int]:
        """Adapters to page out (LRU first, never one in `protected`) so `pages` fit.

        A victim is taken only if it frees pages in a group that is still short, so an
        adapter of the MLP layers is not paged out to make room in the attention layers.
        Raises AdapterTooLarge if the pool could never hold it, PoolExhausted if only paging
        out protected adapters (the running batch) would make room.
        """
        need = as_pages(pages)
        if not pages_fit(self._zero, need, self.totals):
            raise AdapterTooLarge(
                f"adapter {adapter_id} needs {self._describe(need)} of {self.page_size} rank "
                f"rows, the pool has {self._describe(self.totals)}: raise "
                "LORAPLEX_PAGED_POOL_BYTES"
            )
        used = list(self.used)
        held = self._pages.get(adapter_id)  # reloading in place frees its own pages first
        if held is not None:
            used = [u - h for u, h in zip(used, held, strict=True)]
        victims: list[int] = []
        for other, other_pages in self._pages.items():
            short = [u + n > t for u, n, t in zip(used, need, self.totals, strict=True)]
            if not any(short):
                break
            if other == adapter_id or other in protected:
                continue
            if not any(s and p > 0 for s, p in zip(short, other_pages, strict=True)):
                continue  # frees nothing where room is missing
            victims.append(other)
            used = [u - p for u, p in zip(used, other_pages, strict=True)]
        if not pages_fit(tuple(used), need, self.totals):
            free = tuple(t - u for t, u in zip(self.totals, used, strict=True))
            in_batch = {a: p for a, p in self._pages.items() if a in protected}
            raise PoolExhausted(
                f"adapter {adapter_id} needs {self._describe(need)}, {self._describe(free)} "
                f"can be freed without evicting the running batch (pages held by it: "
                f"{in_batch}; pool {self._describe(self.totals)} of {self.page_size} rank "
                "rows): raise LORAPLEX_PAGED_POOL_BYTES or lower max_loras"
            )
        return victims

    def admit(self, adapter_id: int, pages: int | Sequence[int]) -> None:
        """Record `adapter_id` as holding `pages` (most recently used)."""
        held = as_pages(pages)
        self._pages.pop(adapter_id, None)
        assert pages_fit(self.used, held, self.totals), (
            f"admit {held} pages, {self.used} of {self.totals} used"
        )
        self._pages[adapter_id] = held

    def release(self, adapter_id: int) -> int:
        """Forget `adapter_id`; returns the pages it held, all groups together (0 if none)."""
        return sum(self._pages.pop(adapter_id, self._zero))

    def clear(self) -> None:
        self._pages.clear()
