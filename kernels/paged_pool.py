"""Paged LoRA weight pool for one wrapped linear layer (or one fused group such as q/k/v).

Layout (S-LoRA style, storage proportional to each adapter's own rank):

    a_pages    [num_pages, num_slices, P, H_in]   rank rows of A, one block per slice
    b_pages    [num_pages, P, H_out]              rank rows of Bᵀ, slices side by side:
                                                  columns [bounds[i], bounds[i+1]) are slice i
    page_table [num_slots, max_pages] int32       page holding rank rows [p*P, (p+1)*P) of the
                                                  adapter in a slot; -1 = not mapped
    slot_rank  [num_slots] int32, slot_scale [num_slots] float32
    page_owner [num_pages] int64                  slot whose rank rows a page holds; -1 = free

Rank row j of slot a lives in page page_table[a, j // P] at row j % P, for A of every slice
and for B: one page id serves the whole fused layer. An adapter of rank r takes ceil(r / P)
pages. The contiguous-slot layout (vLLM's `[max_loras, max_rank, H]` buffers) is the
degenerate case P = max_rank with page_table[a, 0] = a: see `PagedLoraPool.contiguous`.

Every page that is free or held by an adapter with finite weights is finite. An adapter whose
rank rows are not all finite in the pool's dtype (a diverged fine-tune, an fp16 cast that
overflowed) is still loaded, so its own requests get what its weights give, but its slot is
listed in `nonfinite_slots` and its pages are zeroed when it leaves. Readers that multiply
many adapters' rows at once (kernels.paged_lora_cpu's batched pass, where 0 x inf = NaN
would reach every other row) keep such an adapter out of the shared pass.

The pool itself is a plain allocator over page ids. `load` stages the rank rows on the host
and copies them through a `PageCopier` (kernels.page_copier): inline on CPU; on CUDA on the
current stream, or on the worker's side stream after the kernels still reading the pages it
reuses. Neither is part of a captured step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from kernels.page_copier import PageCopier


def lora_scale(alpha: float, rank: int, *, use_rslora: bool = False) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    assert rank > 0, f"rank must be positive, got {rank}"
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class PoolFull(RuntimeError):
    """Raised by `PagedLoraPool.load` when there are not enough free pages."""


class PagedLoraPool:
    """Fixed-size pages of adapter rank rows plus the page table that maps slots onto them."""

    def __init__(
        self,
        *,
        num_pages: int,
        page_size: int,
        num_slots: int,
        max_rank: int,
        hidden_in: int,
        slice_widths: Sequence[int],
        dtype: torch.dtype,
        device: torch.device | str,
        copier: PageCopier | None = None,
    ) -> None:
        assert num_pages > 0 and page_size > 0 and num_slots > 0, "sizes must be positive"
        assert max_rank >= 1, f"max_rank must be >= 1, got {max_rank}"
        assert len(slice_widths) >= 1 and all(w > 0 for w in slice_widths), (
            f"slice_widths must be positive, got {list(slice_widths)}"
        )
        self.page_size = page_size
        self.max_rank = max_rank
        self.slice_widths = tuple(int(w) for w in slice_widths)
        self.hidden_in = hidden_in
        self.hidden_out = sum(self.slice_widths)
        max_pages = -(-max_rank // page_size)
        n_slices = len(self.slice_widths)
        dev = torch.device(device)
        self.copier = copier if copier is not None else PageCopier(dev, side_stream=False)
        assert self.copier.device == dev or dev.type == "cpu" == self.copier.device.type, (
            f"copier for {self.copier.device}, pool on {dev}"
        )
        self.a_pages = torch.zeros(
            num_pages, n_slices, page_size, hidden_in, dtype=dtype, device=dev
        )
        self.b_pages = torch.zeros(num_pages, page_size, self.hidden_out, dtype=dtype, device=dev)
        self.page_table = torch.full((num_slots, max_pages), -1, dtype=torch.int32, device=dev)
        self.slot_rank = torch.zeros(num_slots, dtype=torch.int32, device=dev)
        self.slot_scale = torch.zeros(num_slots, dtype=torch.float32, device=dev)
        self.page_owner = torch.full((num_pages,), -1, dtype=torch.int64, device=dev)
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._slot_pages: dict[int, list[int]] = {}
        # page -> copier event after the last kernels that may touch it (set when freed); at
        # first the zero fill above, which a side-stream copy must not race either
        self._freed_at: dict[int, torch.cuda.Event | None] = dict.fromkeys(
            range(num_pages), self.copier.mark_freed(fresh=True)
        )
        self._page_is_slot = False
        self._nonfinite: set[int] = set()  # slots whose rank rows hold inf or NaN

    @classmethod
    def contiguous(
        cls,
        *,
        num_slots: int,
        max_rank: int,
        hidden_in: int,
        slice_widths: Sequence[int],
        dtype: torch.dtype,
        device: torch.device | str,
        copier: PageCopier | None = None,
    ) -> PagedLoraPool:
        """vLLM's per-slot layout: one max-rank page per slot, page id == slot."""
        pool = cls(
            num_pages=num_slots,
            page_size=max_rank,
            num_slots=num_slots,
            max_rank=max_rank,
            hidden_in=hidden_in,
            slice_widths=slice_widths,
            dtype=dtype,
            device=device,
            copier=copier,
        )
        pool._page_is_slot = True
        return pool

    @staticmethod
    def page_bytes(
        *, page_size: int, hidden_in: int, slice_widths: Sequence[int], dtype: torch.dtype
    ) -> int:
        """Bytes one page takes (A rows of every slice plus the B rows)."""
        elem = torch.empty((), dtype=dtype).element_size()
        return page_size * (len(slice_widths) * hidden_in + sum(slice_widths)) * elem

    @classmethod
    def pages_for_budget(
        cls,
        budget_bytes: int,
        *,
        page_size: int,
        hidden_in: int,
        slice_widths: Sequence[int],
        dtype: torch.dtype,
    ) -> int:
        """How many pages fit in `budget_bytes`."""
        per_page = cls.page_bytes(
            page_size=page_size, hidden_in=hidden_in, slice_widths=slice_widths, dtype=dtype
        )
        return budget_bytes // per_page

    @property
    def slice_bounds(self) -> tuple[int, ...]:
        """Column bounds of the slices in b_pages and in the layer output: (0, w0, w0+w1, …)."""
        bounds = [0]
        for w in self.slice_widths:
            bounds.append(bounds[-1] + w)
        return tuple(bounds)

    @property
    def num_pages(self) -> int:
        return self.a_pages.shape[0]

    @property
    def num_slots(self) -> int:
        return self.page_table.shape[0]

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def pages_needed(self, rank: int) -> int:
        return -(-rank // self.page_size)

    @property
    def nonfinite_slots(self) -> frozenset[int]:
        """Slots holding an adapter with inf or NaN among its rank rows (in the pool's dtype)."""
        return frozenset(self._nonfinite)

    def slot_pages(self, slot: int) -> list[int]:
        """Page ids held by `slot`, in rank-row order (empty if the slot is free)."""
        return list(self._slot_pages.get(slot, []))

    def load(
        self,
        slot: int,
        lora_a: Sequence[torch.Tensor],
        lora_b: Sequence[torch.Tensor],
        scale: float,
    ) -> list[int]:
        """Copy one adapter into `slot`, replacing what was there; returns its page ids.

        lora_a: per slice, PEFT's A  [r, H_in]
        lora_b: per slice, PEFT's B  [slice_widths[i], r]
        """
        n_slices = len(self.slice_widths)
        assert 0 <= slot < self.num_slots, f"slot {slot} outside [0, {self.num_slots})"
        assert len(lora_a) == n_slices and len(lora_b) == n_slices, (
            f"expected {n_slices} A and B tensors, got {len(lora_a)} and {len(lora_b)}"
        )
        rank = lora_a[0].shape[0]
        assert 1 <= rank <= self.max_rank, f"rank {rank} outside [1, {self.max_rank}]"
        for i, (a, b) in enumerate(zip(lora_a, lora_b, strict=True)):
            assert a.shape == (rank, self.hidden_in), (
                f"slice {i}: A must be [{rank}, {self.hidden_in}], got {tuple(a.shape)}"
            )
            assert b.shape == (self.slice_widths[i], rank), (
                f"slice {i}: B must be [{self.slice_widths[i]}, {rank}], got {tuple(b.shape)}"
            )
        n_pages = self.pages_needed(rank)
        available = len(self._free) + len(self._slot_pages.get(slot, []))
        if n_pages > available:  # checked before evicting: a refused load changes nothing
            raise PoolFull(f"rank {rank} needs {n_pages} pages, {available} available")
        self.evict(slot)
        if self._page_is_slot:
            self._free.remove(slot)
            pages = [slot]
        else:
            pages = [self._free.pop() for _ in range(n_pages)]
        self._slot_pages[slot] = pages

        # Staged page-major on the host, [n_pages, n_slices, P, H_in] and [n_pages, P, H_out],
        # so each goes to the device in one copy; rows past the rank stay zero so a reader
        # that over-reads (the pad-to-max baseline) adds nothing.
        p, dt = self.page_size, self.a_pages.dtype
        a_host = self.copier.host_zeros(n_pages, n_slices, p, self.hidden_in, dtype=dt)
        b_host = self.copier.host_zeros(n_pages, p, self.hidden_out, dtype=dt)
        b_rows = b_host.flatten(0, 1)  # [n_pages * P, H_out], a view
        full, rest = divmod(rank, p)
        for i, (a, b) in enumerate(zip(lora_a, lora_b, strict=True)):
            a_pages_i = a_host[:, i]  # [n_pages, P, H_in], a strided view
            a_pages_i[:full] = a[: full * p].reshape(full, p, self.hidden_in)
            if rest:
                a_pages_i[full, :rest] = a[full * p :]
            lo, hi = self.slice_bounds[i : i + 2]
            b_rows[:rank, lo:hi] = b.t()
        # Checked on the staged host rows, after the cast to the pool's dtype: no device sync.
        if not (bool(torch.isfinite(a_host).all()) and bool(torch.isfinite(b_host).all())):
            self._nonfinite.add(slot)
        self.copier.copy_pages(
            (self.a_pages, self.b_pages),
            pages,
            (a_host, b_host),
            after=[self._freed_at.pop(page, None) for page in pages],
        )
        row = pages + [-1] * (self.page_table.shape[1] - n_pages)
        self.page_table[slot].copy_(self.copier.device_tensor(row, torch.int32))
        # index_fill_ / fill_ take the value as a kernel argument: `t[i] = number` would
        # copy a host scalar with a blocking copy, waiting for the previous step
        self.page_owner.index_fill_(0, self.copier.device_tensor(pages, torch.long), slot)
        self.slot_rank[slot].fill_(rank)
        self.slot_scale[slot].fill_(scale)
        return list(pages)

    def evict(self, slot: int) -> None:
        """Free `slot`'s pages and unmap it (its tokens then get no delta: rank 0)."""
        pages = self._slot_pages.pop(slot, [])
        self.page_table[slot].fill_(-1)
        if pages:
            zeroed = slot in self._nonfinite
            if zeroed:  # free pages stay finite (module docstring)
                # after its page-in, which may still be in flight on the side stream (a
                # prefetch evicted before any step waited for it)
                self.copier.wait_ready()
                index = self.copier.device_tensor(pages, torch.long)
                self.a_pages.index_fill_(0, index, 0.0)
                self.b_pages.index_fill_(0, index, 0.0)
            # A fresh event after the zero fill, not the interval's shared one (recorded
            # before it): a side-stream copy into these pages must not land before the fill.
            freed = self.copier.mark_freed(fresh=zeroed)
            self._freed_at.update(dict.fromkeys(pages, freed))
            self._free.extend(reversed(pages))
            self.page_owner.index_fill_(0, self.copier.device_tensor(pages, torch.long), -1)
        self._nonfinite.discard(slot)
        self.slot_rank[slot].fill_(0)
        self.slot_scale[slot].fill_(0.0)
