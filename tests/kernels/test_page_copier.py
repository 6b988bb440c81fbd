"""Page-in copies: inline on CPU; on CUDA on a side stream that overlaps the compute stream
but never overwrites a page a queued kernel still reads, nor lets a later kernel read a page
before its copy has landed, and without a host sync. The CUDA cases need only torch (no vLLM)
and run on a GPU (benchmarks/kernels/gpu_session.sh)."""

from __future__ import annotations

import time

import pytest
import torch

from kernels.page_copier import PageCopier
from kernels.paged_pool import PagedLoraPool

HIDDEN, WIDTHS, PAGE = 64, (64, 16, 16), 8


def adapter(rank: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return (
        [torch.randn(rank, HIDDEN, generator=gen) for _ in WIDTHS],
        [torch.randn(w, rank, generator=gen) for w in WIDTHS],
    )


def make(num_pages: int, device: torch.device, copier: PageCopier | None = None) -> PagedLoraPool:
    return PagedLoraPool(
        num_pages=num_pages,
        page_size=PAGE,
        num_slots=4,
        max_rank=64,
        hidden_in=HIDDEN,
        slice_widths=WIDTHS,
        dtype=torch.float32,
        device=device,
        copier=copier,
    )


def rows(pool: PagedLoraPool, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [slices, r, H] and Bᵀ [r, H_out] of a slot, read through its page table on the host."""
    rank = int(pool.slot_rank[slot])
    r = torch.arange(rank)
    page = pool.page_table[slot].long().cpu()[r // PAGE]
    a_pages, b_pages = pool.a_pages.cpu(), pool.b_pages.cpu()
    return a_pages[page, :, r % PAGE].transpose(0, 1), b_pages[page, r % PAGE]


def expected(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack(a), torch.cat([m.t() for m in b], dim=1)


def assert_holds(
    pool: PagedLoraPool, slot: int, a: list[torch.Tensor], b: list[torch.Tensor]
) -> None:
    got_a, got_b = rows(pool, slot)
    want_a, want_b = expected(a, b)
    assert torch.equal(got_a, want_a) and torch.equal(got_b, want_b)


def test_cpu_copies_inline() -> None:
    copier = PageCopier("cpu")
    assert not copier.asynchronous and not copier.host_zeros(2, 3, dtype=torch.float16).is_pinned()
    assert copier.mark_freed() is None
    pool = make(16, torch.device("cpu"), copier)
    a, b = adapter(13, seed=1)  # two pages, the second one partly filled
    pool.load(0, a, b, scale=1.0)
    copier.wait_ready()
    assert copier.copies_done()
    assert_holds(pool, 0, a, b)
    page = pool.slot_pages(0)[1]
    assert not pool.a_pages[page, :, 13 - PAGE :].any()  # rows past the rank stay zero


def _sleep_cycles(seconds: float) -> int:
    """GPU clock cycles of `torch.cuda._sleep` that take about `seconds` on this device."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1000)  # load the kernel before timing it
    start.record()
    torch.cuda._sleep(20_000_000)
    end.record()
    end.synchronize()
    return int(20_000_000 * seconds * 1000 / start.elapsed_time(end))


@pytest.mark.gpu
@pytest.mark.parametrize("side_stream", [True, False], ids=["side-stream", "current-stream"])
def test_cuda_copies_equal_the_host_rows(side_stream: bool) -> None:
    dev = torch.device("cuda")
    copier = PageCopier(dev, side_stream=side_stream)
    assert copier.asynchronous == side_stream
    pool = make(32, dev, copier)  # loads straight after the pool's zero fill
    loaded = {}
    for slot, rank in enumerate([1, 8, 13, 64]):
        loaded[slot] = adapter(rank, seed=slot)
        pool.load(slot, *loaded[slot], scale=1.0)
    copier.wait_ready()
    torch.cuda.current_stream().synchronize()
    for slot, (a, b) in loaded.items():
        assert_holds(pool, slot, a, b)


@pytest.mark.gpu
def test_copy_into_freed_pages_waits_for_kernels_still_reading_them() -> None:
    dev = torch.device("cuda")
    copier = PageCopier(dev)
    pool = make(2, dev, copier)  # room for one rank-16 adapter: the second reuses its pages
    old, new = adapter(16, seed=1), adapter(16, seed=2)
    pool.load(0, *old, scale=1.0)
    copier.wait_ready()
    torch.cuda.synchronize()

    torch.cuda._sleep(_sleep_cycles(0.5))  # a long step still queued on the compute stream ...
    read_by_step = pool.a_pages.clone(), pool.b_pages.clone()  # ... reading the old pages
    step_done = torch.cuda.Event()
    step_done.record()
    pool.evict(0)
    assert pool.load(1, *new, scale=1.0) == [0, 1]  # the same pages, copied on the side stream
    # evict and load returned while the step still runs (no host sync), so the copy really
    # was queued before the step's read had happened: only the freed-page event orders them
    assert not step_done.query(), "evict/load waited for the compute stream"
    copier.wait_ready()
    read_next_step = pool.a_pages.clone(), pool.b_pages.clone()
    torch.cuda.synchronize()

    old_a, old_b = expected(*old)
    new_a, new_b = expected(*new)
    assert torch.equal(read_by_step[0].cpu().transpose(0, 1).flatten(1, 2), old_a)
    assert torch.equal(read_by_step[1].cpu().flatten(0, 1), old_b)
    assert torch.equal(read_next_step[0].cpu().transpose(0, 1).flatten(1, 2), new_a)
    assert torch.equal(read_next_step[1].cpu().flatten(0, 1), new_b)


@pytest.mark.gpu
def test_copy_into_free_pages_overlaps_the_compute_stream() -> None:
    dev = torch.device("cuda")
    copier = PageCopier(dev)
    pool = make(16, dev, copier)
    warm = adapter(16, seed=3)
    pool.load(0, *warm, scale=1.0)  # first pinned and device allocations, outside the timing
    copier.wait_ready()
    pool.evict(0)
    torch.cuda.synchronize()
    copier.wait_ready()  # a new interval: the next frees need a new event

    torch.cuda._sleep(_sleep_cycles(1.0))
    step_done = torch.cuda.Event()
    step_done.record()
    a, b = adapter(16, seed=4)
    pool.load(1, *a, scale=1.0)  # into pages freed before the step began: no wait
    deadline = time.monotonic() + 0.8
    while not copier.copies_done() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert copier.copies_done(), "the copy waited for the compute stream"
    assert not step_done.query(), "the compute stream finished first: nothing overlapped"
    copier.wait_ready()
    torch.cuda.synchronize()
    assert_holds(pool, 1, a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("side_stream", [True, False], ids=["side-stream", "current-stream"])
def test_page_in_and_out_never_sync_the_host(side_stream: bool) -> None:
    dev = torch.device("cuda")
    copier = PageCopier(dev, side_stream=side_stream)
    pool = make(8, dev, copier)
    first, second = adapter(24, seed=5), adapter(20, seed=6)
    pool.load(0, *first, scale=0.5)  # first allocations outside the check
    copier.wait_ready()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any blocking copy or synchronize raises
    try:
        pool.evict(0)
        pool.load(1, *second, scale=0.25)
        pool.load(2, *first, scale=0.5)
        copier.wait_ready()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert_holds(pool, 1, *second)
    assert_holds(pool, 2, *first)
    assert pool.slot_scale.tolist()[:3] == [0.0, 0.25, 0.5]
    assert pool.slot_rank.tolist()[:3] == [0, 20, 24]


@pytest.mark.gpu
def test_an_evicted_non_finite_adapter_is_zeroed_after_its_copy_landed() -> None:
    """A prefetched adapter with inf weights, evicted before any step waited for its copy:
    the zero fill on the compute stream must land after the side-stream copy, or the freed
    pages keep the inf the CPU path's batched pass must never read."""
    dev = torch.device("cuda")
    copier = PageCopier(dev)
    pool = make(4, dev, copier)
    a, b = adapter(16, seed=7)
    b[1][2, 3] = float("inf")
    copier.wait_ready()
    torch.cuda.synchronize()
    with torch.cuda.stream(copier.side_stream):
        torch.cuda._sleep(_sleep_cycles(0.5))  # the copy queues behind this
    pool.load(0, a, b, scale=1.0)
    assert pool.nonfinite_slots == {0}
    pages = pool.slot_pages(0)
    pool.evict(0)
    torch.cuda.synchronize()
    assert pool.nonfinite_slots == frozenset()
    assert not pool.a_pages[pages].any() and not pool.b_pages[pages].any()
