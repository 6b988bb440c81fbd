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

The pool itself is a plain allocator over page ids; `load`/`evict` copy weights on the
caller's stream and are not part of the captured step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


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
        self._page_is_slot = False

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

        p = self.page_size
        padded = n_pages * p
        dev, dt = self.a_pages.device, self.a_pages.dtype
        # [n_slices, padded, H_in] -> pages; rows past the rank are zero so a reader that
        # over-reads (the pad-to-max baseline) adds nothing.
        a_rows = torch.zeros(n_slices, padded, self.hidden_in, dtype=dt, device=dev)
        a_rows[:, :rank] = torch.stack([a.to(device=dev, dtype=dt) for a in lora_a])
        b_rows = torch.zeros(padded, self.hidden_out, dtype=dt, device=dev)
        b_rows[:rank] = torch.cat([b.to(device=dev, dtype=dt).t() for b in lora_b], dim=1)
        index = torch.tensor(pages, dtype=torch.long, device=dev)
        self.a_pages.index_copy_(0, index, a_rows.view(n_slices, n_pages, p, -1).transpose(0, 1))
        self.b_pages.index_copy_(0, index, b_rows.view(n_pages, p, -1))

        row = torch.full((self.page_table.shape[1],), -1, dtype=torch.int32)
        row[:n_pages] = torch.tensor(pages, dtype=torch.int32)
        self.page_table[slot].copy_(row)
        self.page_owner[index] = slot
        self.slot_rank[slot] = rank
        self.slot_scale[slot] = scale
        return list(pages)

    def evict(self, slot: int) -> None:
        """Free `slot`'s pages and unmap it (its tokens then get no delta: rank 0)."""
        pages = self._slot_pages.pop(slot, [])
        self._free.extend(reversed(pages))
        self.page_table[slot].fill_(-1)
        if pages:
            self.page_owner[torch.tensor(pages, dtype=torch.long)] = -1
        self.slot_rank[slot] = 0
        self.slot_scale[slot] = 0.0
