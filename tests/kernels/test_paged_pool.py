"""Paged adapter pool: rank-proportional pages, page table contents, allocation."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.paged_pool import PagedLoraPool, PoolFull, lora_scale

HIDDEN, WIDTHS = 32, (32, 8, 8)


def adapter(rank: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return (
        [torch.randn(rank, HIDDEN, generator=gen) for _ in WIDTHS],
        [torch.randn(w, rank, generator=gen) for w in WIDTHS],
    )


def make(num_pages: int, page_size: int, num_slots: int = 4) -> PagedLoraPool:
    return PagedLoraPool(
        num_pages=num_pages,
        page_size=page_size,
        num_slots=num_slots,
        max_rank=128,
        hidden_in=HIDDEN,
        slice_widths=WIDTHS,
        dtype=torch.float32,
        device="cpu",
    )


def gather(pool: PagedLoraPool, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank rows of a slot read back through the page table: A [slices, r, H], Bᵀ [r, H_out]."""
    rank, p = int(pool.slot_rank[slot]), pool.page_size
    rows = torch.arange(rank)
    page = pool.page_table[slot].long()[rows // p]
    return pool.a_pages[page, :, rows % p].transpose(0, 1), pool.b_pages[page, rows % p]


def test_pages_follow_rank_and_rows_round_trip() -> None:
    pool = make(num_pages=20, page_size=8)
    for slot, rank in enumerate([1, 8, 9, 64]):
        a, b = adapter(rank, slot)
        pages = pool.load(slot, a, b, scale=lora_scale(16, rank))
        assert len(pages) == math.ceil(rank / 8)
        assert pool.page_table[slot].tolist()[: len(pages)] == pages
        assert all(p == -1 for p in pool.page_table[slot].tolist()[len(pages) :])
        got_a, got_b = gather(pool, slot)
        assert torch.equal(got_a, torch.stack(a))
        assert torch.equal(got_b, torch.cat([m.t() for m in b], dim=1))
    assert pool.num_free_pages == 20 - (1 + 1 + 2 + 8)
    assert pool.slot_rank.tolist() == [1, 8, 9, 64]
    assert pool.slot_scale[3].item() == pytest.approx(16 / 64)


def test_evict_frees_pages_and_reload_reuses_them() -> None:
    pool = make(num_pages=10, page_size=4)
    a, b = adapter(40, 0)
    first = pool.load(0, a, b, 1.0)
    assert pool.num_free_pages == 0
    with pytest.raises(PoolFull):
        pool.load(1, *adapter(1, 1), 1.0)
    with pytest.raises(PoolFull):  # refused: slot 0 keeps its adapter
        pool.load(0, *adapter(41, 1), 1.0)
    assert pool.slot_pages(0) == first and pool.slot_rank[0] == 40
    pool.evict(0)
    assert pool.num_free_pages == 10
    assert pool.page_table[0].tolist() == [-1] * pool.page_table.shape[1]
    assert pool.slot_rank[0] == 0
    assert sorted(pool.load(1, *adapter(40, 2), 1.0)) == sorted(first)


def test_reloading_a_slot_replaces_and_zeroes_the_tail() -> None:
    pool = make(num_pages=4, page_size=8)
    pool.load(0, *adapter(8, 0), 1.0)
    pool.load(0, *adapter(3, 1), 1.0)  # same slot, smaller rank: old page reused
    assert pool.num_free_pages == 3
    page = pool.page_table[0, 0]
    assert torch.count_nonzero(pool.a_pages[page, :, 3:]) == 0
    assert torch.count_nonzero(pool.b_pages[page, 3:]) == 0


def test_contiguous_layout_is_one_page_per_slot() -> None:
    pool = PagedLoraPool.contiguous(
        num_slots=3,
        max_rank=16,
        hidden_in=HIDDEN,
        slice_widths=WIDTHS,
        dtype=torch.float16,
        device="cpu",
    )
    for slot in (2, 0):
        pool.load(slot, *adapter(5 + slot, slot), 1.0)
    assert pool.page_table.tolist() == [[0], [-1], [2]]
    assert pool.a_pages.shape == (3, 3, 16, HIDDEN)
    assert pool.slice_bounds == (0, 32, 40, 48)


def test_budget_sizes_the_pool_and_checks_shapes() -> None:
    per_page = PagedLoraPool.page_bytes(
        page_size=16, hidden_in=4096, slice_widths=(4096, 1024, 1024), dtype=torch.bfloat16
    )
    assert per_page == 16 * (3 * 4096 + 6144) * 2
    assert (
        PagedLoraPool.pages_for_budget(
            10 * per_page + 1,
            page_size=16,
            hidden_in=4096,
            slice_widths=(4096, 1024, 1024),
            dtype=torch.bfloat16,
        )
        == 10
    )
    pool = make(num_pages=4, page_size=8)
    a, b = adapter(4, 0)
    with pytest.raises(AssertionError, match="slice 1: B must be"):
        pool.load(0, a, [b[0], b[0], b[2]], 1.0)
    with pytest.raises(AssertionError, match="rank 129"):
        pool.load(0, *adapter(129, 0), 1.0)


def test_lora_scale() -> None:
    assert lora_scale(16, 8) == 2.0
    assert lora_scale(16, 64, use_rslora=True) == 2.0
