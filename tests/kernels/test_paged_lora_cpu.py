"""The CPU torch path of the paged vLLM layers against the SGMV torch references."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernels import paged_lora_cpu
from kernels.paged_lora_cpu import paged_lora_pool_cpu
from kernels.paged_pool import PagedLoraPool
from kernels.paged_step_rows import OWN_GEMM_ROWS, split_rows
from kernels.sgmv_expand import sgmv_expand_ref
from kernels.sgmv_metadata import SgmvMetadataBuilder
from kernels.sgmv_shrink import sgmv_shrink_ref
from tests.kernels.test_sgmv_ops import TOL, make_adapters, make_pool

CPU = torch.device("cpu")
# (hidden_in, slice widths): Llama's qkv under GQA (k, v narrower than q), gate/up, one slice.
SHAPES = {"qkv_gqa": (64, (64, 16, 16)), "gate_up": (48, (96, 96)), "o_proj": (80, (80,))}
RANKS = [1, 3, 8, 17, 32, 64]  # mixed ranks in one batch, some not a multiple of the page


def token_slots(n_adapters: int) -> list[int]:
    """A prefill-like mix: long runs, interleaved decode rows, -1 rows, and one row pointing at
    the pool's extra, empty slot (rank 0). Slot 2 gets no rows at all (an empty segment)."""
    empty = n_adapters
    runs = [0] * 20 + [-1] * 4 + [5] * 33 + [1, -1, 3, 4, empty, 0, -1] + [4] * 9
    return [*runs, n_adapters - 1, -1]


def reference(pool: PagedLoraPool, x: torch.Tensor, y0: torch.Tensor, slots: list[int]):
    meta = SgmvMetadataBuilder(
        max_tokens=len(slots), num_slots=pool.num_slots, chunk_size=16, device=CPU
    ).build(torch.tensor(slots, dtype=torch.int32), pool.slot_rank, pool.slot_scale)
    h = sgmv_shrink_ref(x, pool.a_pages, pool.page_table, meta)
    return sgmv_expand_ref(h, pool.b_pages, pool.page_table, meta, y0.clone(), pool.slice_widths)


# How many rows an adapter needs for GEMMs of its own: every adapter (1), the default split
# (the prefill-like runs above go both ways), and none (every row in the batched pass).
SPLITS = {"own_gemms": 1, "default_split": OWN_GEMM_ROWS, "all_batched": 10**9}
# The batched pass gathers the pages it needs, or reads the whole pool masked by page owner.
PASSES = ["gather", "whole_pool"]


@pytest.fixture(params=PASSES)
def batched_pass(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "whole_pool":  # whatever share of the pool the batch holds
        monkeypatch.setattr(paged_lora_cpu, "WHOLE_POOL_MIN_SHARE", 0.0)
    return str(request.param)


def run(
    pool: PagedLoraPool,
    x: torch.Tensor,
    y0: torch.Tensor,
    token_slot: torch.Tensor,
    own_gemm_rows: int = OWN_GEMM_ROWS,
    batched_pass: str = "gather",
):
    return paged_lora_pool_cpu(
        y0.clone(),
        x,
        pool,
        token_slot,
        rows=split_rows(token_slot, pool.num_slots, own_gemm_rows=own_gemm_rows),
        whole_pool=batched_pass == "whole_pool",
    )


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("page_size", [None, 4, 1], ids=["contiguous", "pages_of_4", "pages_of_1"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matches_sgmv_references(
    dtype: torch.dtype, shape: str, page_size: int | None, split: str, batched_pass: str
) -> None:
    hidden, widths = SHAPES[shape]
    adapters = make_adapters(RANKS, hidden, widths, seed=7)
    pool = make_pool(
        adapters,
        hidden=hidden,
        widths=widths,
        page_size=page_size,
        dtype=dtype,
        device=CPU,
        extra_slots=1,
    )
    slots = token_slots(len(adapters))
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(len(slots), hidden, generator=gen).to(dtype)
    y0 = torch.randn(len(slots), sum(widths), generator=gen).to(dtype)
    got = run(pool, x, y0, torch.tensor(slots), SPLITS[split], batched_pass)
    torch.testing.assert_close(got, reference(pool, x, y0, slots), **TOL[dtype])
    untouched = torch.tensor([s < 0 or s == len(adapters) for s in slots])
    assert torch.equal(got[untouched], y0[untouched])  # bit-identical, not merely close
    assert not torch.allclose(got[~untouched], y0[~untouched])  # the delta is really there


def qkv_pool(ranks: list[int], seed: int) -> PagedLoraPool:
    """fp32 GQA qkv pool in pages of 4 rank rows, one slot per rank, spare pages at the end."""
    hidden, widths = SHAPES["qkv_gqa"]
    adapters = make_adapters(ranks, hidden, widths, seed=seed)
    kw = {"hidden": hidden, "widths": widths, "page_size": 4, "dtype": torch.float32}
    return make_pool(adapters, **kw, device=CPU)


@pytest.mark.parametrize("split", list(SPLITS))
def test_rows_past_the_mapping_and_all_minus_one_get_nothing(split: str, batched_pass: str) -> None:
    hidden, widths = SHAPES["qkv_gqa"]
    pool = qkv_pool([8, 16], seed=9)
    gen = torch.Generator().manual_seed(18)
    x = torch.randn(6, hidden, generator=gen)
    y0 = torch.randn(6, sum(widths), generator=gen)
    # Every slot full and only -1 rows: vLLM 0.32's CPU ops gave these the last slot.
    assert torch.equal(run(pool, x, y0, torch.full((6,), -1), SPLITS[split], batched_pass), y0)
    # Mapping shorter than the batch (padded rows): the extra rows are left alone.
    got = run(pool, x, y0, torch.tensor([1, 0, 1]), SPLITS[split], batched_pass)
    assert torch.equal(got[3:], y0[3:])
    want = reference(pool, x[:3], y0[:3], [1, 0, 1])
    torch.testing.assert_close(got[:3], want, **TOL[torch.float32])


def test_another_adapters_overflow_or_a_freed_page_never_reaches_a_row(batched_pass: str) -> None:
    """Rows of several adapters share one batched pass: slot 0's weights overflow to inf and a
    freed page holds NaN, yet every other row gets exactly its own adapter's delta."""
    hidden, widths = SHAPES["qkv_gqa"]
    pool = qkv_pool([8, 4, 16], seed=12)
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(7, hidden, generator=gen)
    y0 = torch.randn(7, sum(widths), generator=gen)
    slots = [1, 2, 1, -1, 2, 1, 2]
    want = reference(pool, x, y0, slots)
    pool.a_pages[pool.slot_pages(0)] = 3e38  # finite weights whose products overflow
    assert pool.page_owner[-1] == -1  # make_pool leaves spare pages at the end
    pool.a_pages[-1] = float("nan")  # what a freed page might hold
    got = run(pool, x, y0, torch.tensor(slots), 10**9, batched_pass)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    assert torch.isfinite(got).all()
    got = run(pool, x, y0, torch.tensor([0, *slots[1:]]), 10**9, batched_pass)
    torch.testing.assert_close(got[1:], want[1:], **TOL[torch.float32])  # row 0: slot 0's own


@pytest.mark.parametrize("poison", ["inf_b", "nan_a", "fp16_overflow"])
def test_an_adapter_with_non_finite_weights_reaches_only_its_own_rows(
    poison: str, batched_pass: str
) -> None:
    """A diverged adapter (inf or NaN in its weights, or fp32 weights that overflow the
    pool's fp16) is served to its own rows only: the batched pass multiplies every row by the
    zeros its mask leaves on other adapters' rank rows, and 0 x inf = NaN would reach all of
    them. After it leaves, its pages hold zeros and the whole pool is read again."""
    hidden, widths = SHAPES["qkv_gqa"]
    dtype = torch.float16 if poison == "fp16_overflow" else torch.float32
    adapters = make_adapters([8, 4, 16], hidden, widths, seed=23)
    kw = {"hidden": hidden, "widths": widths, "page_size": 4, "dtype": dtype}
    pool = make_pool(adapters, **kw, device=CPU)
    gen = torch.Generator().manual_seed(24)
    x = torch.randn(7, hidden, generator=gen).to(dtype)
    y0 = torch.randn(7, sum(widths), generator=gen).to(dtype)
    slots = [1, 0, 2, -1, 0, 1, 2]
    want = reference(pool, x, y0, slots)
    bad = adapters[0]
    a, b = [t.clone() for t in bad.a], [t.clone() for t in bad.b]
    if poison == "inf_b":
        b[1][3, 2] = float("inf")
    elif poison == "nan_a":
        a[2][5, 0] = float("nan")
    else:
        b[0][0, 0] = 1e6  # finite in fp32, inf once the pool casts it to fp16
    pool.load(0, a, b, bad.scale)
    assert pool.nonfinite_slots == {0}
    got = run(pool, x, y0, torch.tensor(slots), 10**9, batched_pass)
    others = torch.tensor([s != 0 for s in slots])
    torch.testing.assert_close(got[others], want[others], **TOL[dtype])
    assert torch.isfinite(got[others]).all()
    assert not torch.isfinite(got[~others]).all()  # its own rows get what its weights give
    pages = pool.slot_pages(0)
    pool.evict(0)
    assert pool.nonfinite_slots == frozenset()
    assert not pool.a_pages[pages].any() and not pool.b_pages[pages].any()
    got = run(pool, x, y0, torch.tensor([-1 if s == 0 else s for s in slots]), 10**9, "whole_pool")
    torch.testing.assert_close(got[others], want[others], **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_a_decode_step_with_an_adapter_on_every_row(dtype: torch.dtype, batched_pass: str) -> None:
    """Every row has an adapter and none has many rows: the batched pass covers all of x and
    y in order (updated in place for fp32)."""
    hidden, widths = SHAPES["gate_up"]
    adapters = make_adapters([4, 8, 16, 32], hidden, widths, seed=14)
    kw = {"hidden": hidden, "widths": widths, "page_size": 4, "dtype": dtype}
    pool = make_pool(adapters, **kw, device=CPU)
    slots = [2, 0, 3, 3, 1, 0, 2, 1, 3]
    step = split_rows(torch.tensor(slots), pool.num_slots)
    assert step.batched_all_rows and not step.own
    x = torch.randn(len(slots), hidden).to(dtype)
    y0 = torch.randn(len(slots), sum(widths)).to(dtype)
    got = run(pool, x, y0, torch.tensor(slots), OWN_GEMM_ROWS, batched_pass)
    torch.testing.assert_close(got, reference(pool, x, y0, slots), **TOL[dtype])


@pytest.mark.parametrize(
    "slots", [[1, 1, 1], [2, 0, 2, 1, 0], [2, 3, 0, 3, 1]], ids=["one", "three", "with_empty"]
)
def test_adapters_sharing_one_scale_get_it(slots: list[int], batched_pass: str) -> None:
    """The batched pass scales by one number when the step's adapters share it (vLLM folds
    the scale into B, so there it is 1.0); a shared scale other than 1 still applies. Slot 3
    holds nothing in this layer (rank 0, scale 0): its rows get no delta, whatever scale."""
    hidden, widths = SHAPES["qkv_gqa"]
    adapters = make_adapters([4, 8, 16], hidden, widths, seed=21)
    adapters = [dataclasses.replace(a, scale=2.5) for a in adapters]
    kw = {"hidden": hidden, "widths": widths, "page_size": 4, "dtype": torch.float32}
    pool = make_pool(adapters, **kw, device=CPU, extra_slots=1)
    x = torch.randn(len(slots), hidden)
    y0 = torch.randn(len(slots), sum(widths))
    got = run(pool, x, y0, torch.tensor(slots), OWN_GEMM_ROWS, batched_pass)
    torch.testing.assert_close(got, reference(pool, x, y0, slots), **TOL[torch.float32])


def test_the_whole_pool_is_read_unless_the_unowned_pages_cost_more(monkeypatch) -> None:
    calls: list[str] = []

    def spy(name: str):
        real = getattr(paged_lora_cpu, name)

        def call(*args):
            calls.append(name)
            return real(*args)

        return call

    for name in ("_batched", "_batched_whole_pool"):
        monkeypatch.setattr(paged_lora_cpu, name, spy(name))
    hidden, widths = 512, (512, 256, 256)
    adapters = make_adapters([8, 4], hidden, widths, seed=15)
    kw = {"hidden": hidden, "widths": widths, "page_size": 4, "dtype": torch.float32}
    small = make_pool(adapters, **kw, device=CPU)  # 3 pages held, 3 spare
    gen = torch.Generator().manual_seed(16)
    x, y0 = torch.randn(8, hidden, generator=gen), torch.randn(8, sum(widths), generator=gen)
    slots = torch.tensor([0, 1] * 4)
    want = reference(small, x, y0, slots.tolist())
    fp32 = TOL[torch.float32]
    torch.testing.assert_close(run(small, x, y0, slots, batched_pass="whole_pool"), want, **fp32)
    # 60 more pages no one in the step owns: 8 rows x 60 pages x 4 rows x (3 x 512 + 1024)
    # multiply-adds wasted, more than gathering the 3 owned pages costs
    big = PagedLoraPool(
        num_pages=small.num_pages + 60,
        page_size=4,
        num_slots=2,
        max_rank=8,
        hidden_in=hidden,
        slice_widths=widths,
        dtype=torch.float32,
        device=CPU,
    )
    for slot, adapter in enumerate(adapters):
        big.load(slot, adapter.a, adapter.b, adapter.scale)
    torch.testing.assert_close(run(big, x, y0, slots, batched_pass="whole_pool"), want, **fp32)
    assert calls == ["_batched_whole_pool", "_batched"]


@pytest.mark.parametrize("split", list(SPLITS))
def test_a_rank_without_pages_is_refused_not_read(split: str) -> None:
    hidden, widths = SHAPES["o_proj"]
    pool = make_pool(
        make_adapters([8], hidden, widths, seed=10),
        hidden=hidden,
        widths=widths,
        page_size=4,
        dtype=torch.float32,
        device=CPU,
    )
    pool.page_table[0, 1] = -1  # corrupt bookkeeping: rank 8 but only one page mapped
    with pytest.raises(RuntimeError, match="but unmapped pages"):
        run(
            pool,
            torch.randn(2, hidden),
            torch.zeros(2, sum(widths)),
            torch.tensor([0, 0]),
            SPLITS[split],
        )
