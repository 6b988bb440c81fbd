"""SGMV shrink/expand Triton kernels against their torch references (and PEFT's formula)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch

from kernels.paged_pool import PagedLoraPool, lora_scale
from kernels.sgmv_expand import sgmv_expand, sgmv_expand_ref
from kernels.sgmv_metadata import SgmvMetadata, SgmvMetadataBuilder, metadata_from_segments
from kernels.sgmv_shrink import ShrinkConfig, sgmv_shrink, sgmv_shrink_ref

TOL = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 1e-2, "rtol": 1e-2},
    torch.bfloat16: {"atol": 5e-2, "rtol": 2e-2},
}
MAX_RANK = 128
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


@dataclass
class Adapter:
    a: list[torch.Tensor]  # per slice [r, H_in], fp32 master copy
    b: list[torch.Tensor]  # per slice [w, r]
    scale: float


def make_adapters(
    ranks: Sequence[int],
    hidden: int,
    widths: Sequence[int],
    seed: int,
) -> list[Adapter]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, r in enumerate(ranks):
        a = [torch.randn(r, hidden, generator=gen) / hidden**0.5 for _ in widths]
        b = [torch.randn(w, r, generator=gen) / r**0.5 for w in widths]
        out.append(Adapter(a, b, lora_scale(16.0, r, use_rslora=i % 2 == 1)))
    return out


def make_pool(
    adapters: Sequence[Adapter],
    *,
    hidden: int,
    widths: Sequence[int],
    page_size: int | None,
    dtype: torch.dtype,
    device: torch.device,
    extra_slots: int = 0,
) -> PagedLoraPool:
    """page_size None = the contiguous layout (one max-rank page per slot)."""
    n_slots = len(adapters) + extra_slots
    if page_size is None:
        pool = PagedLoraPool.contiguous(
            num_slots=n_slots,
            max_rank=MAX_RANK,
            hidden_in=hidden,
            slice_widths=widths,
            dtype=dtype,
            device=device,
        )
    else:
        pages = sum(-(-ad.a[0].shape[0] // page_size) for ad in adapters) + 3
        pool = PagedLoraPool(
            num_pages=pages,
            page_size=page_size,
            num_slots=n_slots,
            max_rank=MAX_RANK,
            hidden_in=hidden,
            slice_widths=widths,
            dtype=dtype,
            device=device,
        )
    # Load in reverse so page ids are not simply slot order.
    for slot in reversed(range(len(adapters))):
        pool.load(slot, adapters[slot].a, adapters[slot].b, adapters[slot].scale)
    return pool


def rows_layout(name: str, n: int, rng: random.Random) -> list[int] | None:
    if name == "decode_single":
        return [n - 1]
    if name == "decode_mixed":
        return [rng.randrange(-1, n) for _ in range(12)]
    if name == "prefill_long":
        tail = [rng.randrange(-1, n) for _ in range(20)]
        return [0] * 130 + [-1] * 5 + [n - 1] * 100 + tail
    if name == "all_no_adapter":
        return [-1] * 9
    return None


def make_meta(
    layout: str, pool: PagedLoraPool, n_adapters: int, seed: int, device: torch.device
) -> SgmvMetadata:
    rows = rows_layout(layout, n_adapters, random.Random(seed))
    if rows is None:  # "segments_empty": Punica-style segments, some empty, one > BLOCK_M
        n = n_adapters
        lens, ids = [5, 0, 3, 0, 100, 1, 0], [0, 1, n - 1, -1, 1 % n, 2 % n, 0]
        return metadata_from_segments(
            lens, ids, pool.slot_rank.tolist(), pool.slot_scale.tolist(), device=device
        )
    builder = SgmvMetadataBuilder(
        max_tokens=len(rows) + 7, num_slots=pool.num_slots, chunk_size=16, device=device
    )
    ids = torch.tensor(rows, dtype=torch.int32, device=device)
    return builder.build(ids, pool.slot_rank, pool.slot_scale)


def run_both(
    x: torch.Tensor,
    pool: PagedLoraPool,
    meta: SgmvMetadata,
    y0: torch.Tensor,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    h = sgmv_shrink(x, pool.a_pages, pool.page_table, meta)
    y = sgmv_expand(h, pool.b_pages, pool.page_table, meta, y0.clone(), pool.slice_widths)
    h_ref = sgmv_shrink_ref(x, pool.a_pages, pool.page_table, meta)
    y_ref = sgmv_expand_ref(
        h_ref, pool.b_pages, pool.page_table, meta, y0.clone(), pool.slice_widths
    )
    return (h, y), (h_ref, y_ref)


# (hidden_in, slice widths, ranks): GQA-fused q/k/v, single slice, gate/up; hidden 96 is not a
# multiple of the K tile, so the masked-K path runs too.
SHAPES = {
    "h64_qkv_ranks1-128": (64, (64, 16, 16), [1, 8, 37, 64, 128]),
    "h256_single_rank16": (256, (256,), [16, 16, 16]),
    "h96_gateup_ranks8-64": (96, (128, 128), [8, 64, 24, 40]),
}
LAYOUTS = ["decode_single", "decode_mixed", "prefill_long", "all_no_adapter", "segments_empty"]


@pytest.mark.parametrize(
    "page_size", [None, 8, 1], ids=["one_page_per_adapter", "pages_of_8", "pages_of_1"]
)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(
    dtype: torch.dtype, shape: str, layout: str, page_size: int | None, device: torch.device
) -> None:
    hidden, widths, ranks = SHAPES[shape]
    adapters = make_adapters(ranks, hidden, widths, seed=1)
    pool = make_pool(
        adapters, hidden=hidden, widths=widths, page_size=page_size, dtype=dtype, device=device
    )
    meta = make_meta(layout, pool, len(ranks), seed=2, device=device)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(meta.num_tokens, hidden, generator=gen).to(device, dtype)
    y0 = torch.randn(meta.num_tokens, sum(widths), generator=gen).to(device, dtype)
    got, want = run_both(x, pool, meta, y0)
    torch.testing.assert_close(got, want, **TOL[dtype])


def test_reference_matches_peft_formula_per_token(device: torch.device) -> None:
    """Independent oracle: y[t] += scale·(x[t]·Aᵀ)·Bᵀ from the adapters' own A and B."""
    hidden, widths = 64, (64, 16, 16)
    ranks = [3, 16, 70, 128]
    adapters = make_adapters(ranks, hidden, widths, seed=4)
    pool = make_pool(
        adapters,
        hidden=hidden,
        widths=widths,
        page_size=16,
        dtype=torch.float32,
        device=device,
        extra_slots=1,
    )
    rows = [2, -1, 0, 3, 3, 1, -1, 4, 0, 2]  # slot 4 is empty: rank 0, no delta
    meta = SgmvMetadataBuilder(max_tokens=16, num_slots=5, device=device).build(
        torch.tensor(rows, device=device), pool.slot_rank, pool.slot_scale
    )
    x = torch.randn(len(rows), hidden, generator=torch.Generator().manual_seed(5)).to(device)
    y0 = torch.zeros(len(rows), sum(widths), device=device)
    expected = torch.zeros(len(rows), sum(widths))
    for t, slot in enumerate(rows):
        if 0 <= slot < len(adapters):
            ad = adapters[slot]
            expected[t] = torch.cat(
                [ad.scale * (x[t].cpu() @ a.t()) @ b.t() for a, b in zip(ad.a, ad.b, strict=True)]
            )
    (_, y), (_, y_ref) = run_both(x, pool, meta, y0)
    torch.testing.assert_close((y.cpu(), y_ref.cpu()), (expected, expected), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_without_adapter_are_untouched(dtype: torch.dtype, device: torch.device) -> None:
    """Every slot full (where vLLM 0.32's CPU ops let -1 hit the last slot); -1 and out-of-range
    ids must leave y bit-identical and h zero, even when `out` held garbage."""
    hidden, widths = 64, (64,)
    adapters = make_adapters([8, 16, 32], hidden, widths, seed=6)
    pool = make_pool(
        adapters, hidden=hidden, widths=widths, page_size=8, dtype=dtype, device=device
    )
    rows = torch.tensor([-1, 2, -1, 0, 3, 1, 99, -1, 2, -7], device=device)
    meta = SgmvMetadataBuilder(max_tokens=10, num_slots=3, device=device).build(
        rows, pool.slot_rank, pool.slot_scale
    )
    x = torch.randn(10, hidden, device=device).to(dtype)
    y0 = torch.randn(10, hidden, device=device).to(dtype)
    out = torch.full((1, 10, MAX_RANK), float("nan"), device=device)
    h = sgmv_shrink(x, pool.a_pages, pool.page_table, meta, out=out)
    y = sgmv_expand(h, pool.b_pages, pool.page_table, meta, y0.clone(), widths)
    none = ((rows < 0) | (rows >= 3)).cpu()
    assert torch.equal(y[none].cpu(), y0[none].cpu())
    assert torch.equal(h[:, none].cpu(), torch.zeros_like(h[:, none]).cpu())
    assert not torch.equal(y[~none].cpu(), y0[~none].cpu())


def test_page_table_is_honoured(device: torch.device) -> None:
    """A wrong page table (two slots' pages swapped) must change the result, and the kernel
    must agree with the reference under the wrong table too."""
    hidden, widths = 64, (32, 32)
    adapters = make_adapters([16, 16], hidden, widths, seed=7)
    pool = make_pool(
        adapters, hidden=hidden, widths=widths, page_size=8, dtype=torch.float32, device=device
    )
    meta = make_meta("decode_mixed", pool, 2, seed=8, device=device)
    x = torch.randn(meta.num_tokens, hidden, device=device)
    y0 = torch.zeros(meta.num_tokens, 64, device=device)
    (_, y_good), _ = run_both(x, pool, meta, y0)
    pool.page_table.copy_(pool.page_table.flip(0))
    (_, y_bad), (_, y_bad_ref) = run_both(x, pool, meta, y0)
    torch.testing.assert_close(y_bad, y_bad_ref, **TOL[torch.float32])
    assert not torch.allclose(y_bad, y_good, atol=1e-2)


def test_rows_past_rank_and_unmapped_pages_are_not_read(device: torch.device) -> None:
    """Poison everything an adapter does not own: the result must not move."""
    hidden, widths = 64, (48,)
    adapters = make_adapters([5, 37], hidden, widths, seed=9)
    pool = make_pool(
        adapters, hidden=hidden, widths=widths, page_size=8, dtype=torch.float32, device=device
    )
    meta = make_meta("decode_mixed", pool, 2, seed=10, device=device)
    x = torch.randn(meta.num_tokens, hidden, device=device)
    y0 = torch.zeros(meta.num_tokens, 48, device=device)
    _, (h_clean, y_clean) = run_both(x, pool, meta, y0)
    owned = torch.zeros(pool.num_pages, 8, dtype=torch.bool)
    for slot, ad in enumerate(adapters):
        for j in range(ad.a[0].shape[0]):
            owned[pool.slot_pages(slot)[j // 8], j % 8] = True
    pool.a_pages.transpose(1, 2)[~owned.to(device)] = 1e4
    pool.b_pages[~owned.to(device)] = 1e4
    got, _ = run_both(x, pool, meta, y0)
    torch.testing.assert_close(got, (h_clean, y_clean), **TOL[torch.float32])


def test_page_table_hole_inside_rank_reads_as_zero(device: torch.device) -> None:
    """A -1 entry inside an adapter's rank drops those rank rows and never dereferences
    page -1 (poison sits right before the pages, where page -1 would point)."""
    hidden, widths = 64, (48,)
    adapters = make_adapters([5, 37], hidden, widths, seed=15)
    pool = make_pool(
        adapters, hidden=hidden, widths=widths, page_size=8, dtype=torch.float32, device=device
    )
    pool.page_table[1, 2] = -1  # rank rows 16..23 of slot 1
    # inf, not a large finite value: expand multiplies B's holed rows by h's zero columns.
    poison = float("inf")
    a_pages = torch.full((pool.num_pages + 1, *pool.a_pages.shape[1:]), poison, device=device)
    a_pages[1:] = pool.a_pages
    b_pages = torch.full((pool.num_pages + 1, *pool.b_pages.shape[1:]), poison, device=device)
    b_pages[1:] = pool.b_pages
    meta = make_meta("decode_mixed", pool, 2, seed=16, device=device)
    x = torch.randn(meta.num_tokens, hidden, device=device)
    y0 = torch.zeros(meta.num_tokens, 48, device=device)
    h = sgmv_shrink(x, a_pages[1:], pool.page_table, meta)
    y = sgmv_expand(h, b_pages[1:], pool.page_table, meta, y0.clone(), widths)

    holed = adapters[1]
    for m in holed.a:
        m[16:24] = 0
    for m in holed.b:
        m[:, 16:24] = 0
    clean = make_pool(
        adapters, hidden=hidden, widths=widths, page_size=8, dtype=torch.float32, device=device
    )
    _, want = run_both(x, clean, meta, y0)
    torch.testing.assert_close((h, y), want, **TOL[torch.float32])


def test_contiguous_paged_and_padded_layouts_agree(device: torch.device) -> None:
    """The degenerate contiguous layout, pages of 4, and the pad-to-max-rank baseline used by
    the benchmark all compute the same delta."""
    hidden, widths = 64, (64, 32)
    ranks = [4, 12, 33]
    adapters = make_adapters(ranks, hidden, widths, seed=11)
    paged = make_pool(
        adapters, hidden=hidden, widths=widths, page_size=4, dtype=torch.float32, device=device
    )
    contig = make_pool(
        adapters, hidden=hidden, widths=widths, page_size=None, dtype=torch.float32, device=device
    )
    meta = make_meta("decode_mixed", paged, len(ranks), seed=12, device=device)
    x = torch.randn(meta.num_tokens, hidden, device=device)
    y0 = torch.randn(meta.num_tokens, 96, device=device)
    results = []
    for pool, m in ((paged, meta), (contig, meta), (contig, meta.with_rank(MAX_RANK))):
        h = sgmv_shrink(x, pool.a_pages, pool.page_table, m)
        results.append(sgmv_expand(h, pool.b_pages, pool.page_table, m, y0.clone(), widths))
    torch.testing.assert_close(results[1:], results[:1] * 2, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_split_k_shrink_matches_reference(dtype: torch.dtype, device: torch.device) -> None:
    """The atomic split-K path (chosen on GPUs for decode) with a K tail (96 = 2·32 + 32)."""
    hidden, widths = 96, (64,)
    adapters = make_adapters([8, 64, 128], hidden, widths, seed=13)
    pool = make_pool(
        adapters, hidden=hidden, widths=widths, page_size=16, dtype=dtype, device=device
    )
    meta = make_meta("decode_mixed", pool, 3, seed=14, device=device)
    x = torch.randn(meta.num_tokens, hidden, device=device).to(dtype)
    cfg = ShrinkConfig(block_m=16, block_n=32, block_k=32, split_k=2)
    h = sgmv_shrink(x, pool.a_pages, pool.page_table, meta, config=cfg)
    h_ref = sgmv_shrink_ref(x, pool.a_pages, pool.page_table, meta)
    torch.testing.assert_close(h, h_ref, **TOL[dtype])


def random_rows(
    num_tokens: int,
    n_adapters: int,
    seed: int,
    device: torch.device,
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-1, n_adapters, (num_tokens,), generator=gen).to(device)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 64, 2048])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_large_shapes_match_reference(
    dtype: torch.dtype, num_tokens: int, device: torch.device
) -> None:
    """Model-sized fused QKV (GQA widths), ranks 8-128 mixed, decode to long prefill."""
    hidden, widths = 4096, (4096, 1024, 1024)
    ranks = [8, 16, 32, 64, 128, 8, 64, 24]
    adapters = make_adapters(ranks, hidden, widths, seed=20)
    pool = make_pool(
        adapters, hidden=hidden, widths=widths, page_size=16, dtype=dtype, device=device
    )
    builder = SgmvMetadataBuilder(max_tokens=num_tokens, num_slots=len(ranks), device=device)
    meta = builder.build(
        random_rows(num_tokens, len(ranks), 21, device), pool.slot_rank, pool.slot_scale
    )
    x = torch.randn(num_tokens, hidden, device=device, dtype=dtype)
    y0 = torch.randn(num_tokens, sum(widths), device=device, dtype=dtype)
    got, want = run_both(x, pool, meta, y0)
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay(device: torch.device) -> None:
    """Metadata build + shrink + expand captured once, replayed on new batches: no host sync,
    and the replay follows the new adapter ids in the static input buffer."""
    dtype, hidden, widths, num_tokens = torch.bfloat16, 1024, (1024, 256, 256), 48
    ranks = [8, 64, 16, 128]
    pool = make_pool(
        make_adapters(ranks, hidden, widths, seed=30),
        hidden=hidden,
        widths=widths,
        page_size=16,
        dtype=dtype,
        device=device,
    )
    builder = SgmvMetadataBuilder(max_tokens=num_tokens, num_slots=len(ranks), device=device)
    ids = random_rows(num_tokens, len(ranks), 31, device).to(torch.int32)
    x = torch.randn(num_tokens, hidden, device=device, dtype=dtype)
    y = torch.zeros(num_tokens, sum(widths), device=device, dtype=dtype)
    h = torch.empty(len(widths), num_tokens, MAX_RANK, device=device)

    def step() -> None:
        meta = builder.build(ids, pool.slot_rank, pool.slot_scale)
        sgmv_shrink(x, pool.a_pages, pool.page_table, meta, out=h)
        sgmv_expand(h, pool.b_pages, pool.page_table, meta, y, widths)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles the kernels and caches the slice bounds
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for seed in (32, 33, 34):
        ids.copy_(random_rows(num_tokens, len(ranks), seed, device))
        x.copy_(torch.randn(num_tokens, hidden, device=device, dtype=dtype))
        y0 = torch.randn(num_tokens, sum(widths), device=device, dtype=dtype)
        y.copy_(y0)
        graph.replay()
        torch.cuda.synchronize()
        ref_meta = SgmvMetadataBuilder(
            max_tokens=num_tokens, num_slots=len(ranks), device=device
        ).build(ids, pool.slot_rank, pool.slot_scale)
        h_ref = sgmv_shrink_ref(x, pool.a_pages, pool.page_table, ref_meta)
        y_ref = sgmv_expand_ref(h_ref, pool.b_pages, pool.page_table, ref_meta, y0.clone(), widths)
        torch.testing.assert_close((h, y), (h_ref, y_ref), **TOL[dtype])


@pytest.mark.parametrize(
    "dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)], ids=str
)
def test_large_shrink_output_does_not_overflow_half_weights(
    dtype: torch.dtype, device: torch.device
) -> None:
    """h = scale·x·Aᵀ can pass fp16's 65504 while y stays small (a large alpha/r, large
    activations): the expand must not round h to fp16 for its dot, or finite y turns inf."""
    hidden, widths, rank = 64, (32,), 8
    pool = PagedLoraPool(
        num_pages=2,
        page_size=8,
        num_slots=1,
        max_rank=8,
        hidden_in=hidden,
        slice_widths=widths,
        dtype=dtype,
        device=device,
    )
    pool.load(0, [torch.ones(rank, hidden)], [torch.full((widths[0], rank), 1e-4)], scale=32.0)
    x = torch.full((2, hidden), 40.0, device=device, dtype=dtype)  # h = 40·64·32 = 81920
    meta = SgmvMetadataBuilder(max_tokens=2, num_slots=1, device=device).build(
        torch.zeros(2, dtype=torch.int32, device=device), pool.slot_rank, pool.slot_scale
    )
    y0 = torch.zeros(2, widths[0], device=device, dtype=dtype)
    (h, y), want = run_both(x, pool, meta, y0)
    assert h.max().item() > torch.finfo(torch.float16).max
    assert torch.isfinite(y).all()
    torch.testing.assert_close((h, y), want, **TOL[dtype])


def test_reference_masks_holes_without_nan_from_other_pages(device: torch.device) -> None:
    """A hole (-1) in one adapter's page table is read through page 0 and dropped: the
    references must drop it by filling, since inf in page 0 (another adapter's) times a 0 mask
    is NaN, where the kernels' masked loads never read it."""
    hidden, widths = 16, (8,)
    pool = PagedLoraPool(
        num_pages=4,
        page_size=4,
        num_slots=2,
        max_rank=8,
        hidden_in=hidden,
        slice_widths=widths,
        dtype=torch.float32,
        device=device,
    )
    gen = torch.Generator().manual_seed(40)
    poisoned_a, poisoned_b = torch.randn(4, hidden, generator=gen), torch.randn(8, 4, generator=gen)
    poisoned_a[0, 0] = poisoned_b[0, 0] = float("inf")
    pool.load(0, [poisoned_a], [poisoned_b], 1.0)
    assert pool.slot_pages(0) == [0]  # the page a clamped -1 reads
    holed = Adapter(
        [torch.randn(8, hidden, generator=gen)], [torch.randn(8, 8, generator=gen)], 1.0
    )
    pool.load(1, holed.a, holed.b, holed.scale)
    pool.page_table[1, 1] = -1  # rank rows 4..7 of slot 1
    meta = SgmvMetadataBuilder(max_tokens=3, num_slots=2, device=device).build(
        torch.tensor([1, -1, 1], device=device), pool.slot_rank, pool.slot_scale
    )
    x = torch.randn(3, hidden, generator=gen).to(device)
    y0 = torch.zeros(3, widths[0], device=device)
    got, (h_ref, y_ref) = run_both(x, pool, meta, y0)
    assert torch.isfinite(h_ref).all() and torch.isfinite(y_ref).all()
    want = torch.zeros(3, widths[0])
    for t in (0, 2):
        want[t] = (x[t].cpu() @ holed.a[0][:4].t()) @ holed.b[0][:, :4].t()
    torch.testing.assert_close((y_ref.cpu(), got[1].cpu()), (want, want), **TOL[torch.float32])
