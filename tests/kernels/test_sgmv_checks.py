"""The SGMV launchers refuse inputs their kernels cannot index safely, with a ValueError.

Raised, not asserted: `python -O` strips asserts, and a kernel launched on a wrong shape or
stride reads and writes outside its tensors. A page table or metadata tensor whose elements
are not adjacent would be read as if they were (the kernels add plain offsets), so both must
be refused too.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kernels.paged_pool import PagedLoraPool
from kernels.sgmv_expand import _slice_bounds, sgmv_expand, sgmv_expand_ref
from kernels.sgmv_metadata import SgmvMetadata, SgmvMetadataBuilder
from kernels.sgmv_shrink import sgmv_shrink, sgmv_shrink_ref

HIDDEN, WIDTHS, T = 32, (16, 8), 5
ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class Case:
    x: torch.Tensor
    pool: PagedLoraPool
    meta: SgmvMetadata
    h: torch.Tensor
    y: torch.Tensor


@pytest.fixture
def case(device: torch.device) -> Case:
    gen = torch.Generator().manual_seed(0)
    pool = PagedLoraPool(
        num_pages=6,
        page_size=4,
        num_slots=2,
        max_rank=8,
        hidden_in=HIDDEN,
        slice_widths=WIDTHS,
        dtype=torch.float32,
        device=device,
    )
    for slot, rank in enumerate((8, 5)):
        a = [torch.randn(rank, HIDDEN, generator=gen) for _ in WIDTHS]
        b = [torch.randn(w, rank, generator=gen) for w in WIDTHS]
        pool.load(slot, a, b, 0.5)
    meta = SgmvMetadataBuilder(max_tokens=T, num_slots=2, device=device).build(
        torch.tensor([1, 0, -1, 1, 0], device=device), pool.slot_rank, pool.slot_scale
    )
    x = torch.randn(T, HIDDEN, generator=gen).to(device)
    h = torch.zeros(len(WIDTHS), T, 8, device=device)
    return Case(x, pool, meta, h, torch.zeros(T, sum(WIDTHS), device=device))


def strided(t: torch.Tensor) -> torch.Tensor:
    """Same values, every other element of a buffer twice as long: stride 2."""
    return torch.stack([t, t], dim=-1)[..., 0]


def column_major(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


Launch = Callable[[Case], object]
SHRINK_CASES: dict[str, tuple[Launch, str]] = {
    "x_not_2d": (
        lambda c: sgmv_shrink(c.x[None], c.pool.a_pages, c.pool.page_table, c.meta),
        "x must be",
    ),
    "dtypes_differ": (
        lambda c: sgmv_shrink(c.x.half(), c.pool.a_pages, c.pool.page_table, c.meta),
        "a_pages is",
    ),
    "hidden_differs": (
        lambda c: sgmv_shrink(c.x[:, :16], c.pool.a_pages, c.pool.page_table, c.meta),
        "H_in",
    ),
    "x_rows_strided": (
        lambda c: sgmv_shrink(strided(c.x), c.pool.a_pages, c.pool.page_table, c.meta),
        "rows must be contiguous",
    ),
    "page_table_int64": (
        lambda c: sgmv_shrink(c.x, c.pool.a_pages, c.pool.page_table.long(), c.meta),
        "page_table must be int32",
    ),
    "page_table_column_major": (
        lambda c: sgmv_shrink(c.x, c.pool.a_pages, column_major(c.pool.page_table), c.meta),
        "page_table rows must be contiguous",
    ),
    "token_count_differs": (
        lambda c: sgmv_shrink(c.x[:3], c.pool.a_pages, c.pool.page_table, c.meta),
        "metadata for 5 tokens",
    ),
    "token_ids_strided": (
        lambda c: sgmv_shrink(
            c.x,
            c.pool.a_pages,
            c.pool.page_table,
            dataclasses.replace(c.meta, token_ids=strided(c.meta.token_ids)),
        ),
        "meta.token_ids must be contiguous",
    ),
    "seg_scale_short": (
        lambda c: sgmv_shrink(
            c.x,
            c.pool.a_pages,
            c.pool.page_table,
            dataclasses.replace(c.meta, seg_scale=c.meta.seg_scale[:-1]),
        ),
        "meta.seg_scale must be",
    ),
    "out_too_narrow": (
        lambda c: sgmv_shrink(
            c.x, c.pool.a_pages, c.pool.page_table, c.meta, out=c.h[:, :, :4].contiguous()
        ),
        "out must be",
    ),
}
EXPAND_CASES: dict[str, tuple[Launch, str]] = {
    "y_too_narrow": (
        lambda c: sgmv_expand(c.h, c.pool.b_pages, c.pool.page_table, c.meta, c.y[:, :16], WIDTHS),
        "y must be",
    ),
    "h_not_fp32": (
        lambda c: sgmv_expand(c.h.half(), c.pool.b_pages, c.pool.page_table, c.meta, c.y, WIDTHS),
        "h must be float32",
    ),
    "h_rank_columns_differ": (
        lambda c: sgmv_expand(
            c.h[:, :, :4], c.pool.b_pages, c.pool.page_table, c.meta, c.y, WIDTHS
        ),
        "rank columns",
    ),
    "widths_count_differs": (
        lambda c: sgmv_expand(c.h, c.pool.b_pages, c.pool.page_table, c.meta, c.y, (24,)),
        "slice widths, h has",
    ),
    "page_table_column_major": (
        lambda c: sgmv_expand(
            c.h, c.pool.b_pages, column_major(c.pool.page_table), c.meta, c.y, WIDTHS
        ),
        "page_table rows must be contiguous",
    ),
    "seg_indptr_strided": (
        lambda c: sgmv_expand(
            c.h,
            c.pool.b_pages,
            c.pool.page_table,
            dataclasses.replace(c.meta, seg_indptr=strided(c.meta.seg_indptr)),
            c.y,
            WIDTHS,
        ),
        "meta.seg_indptr must be contiguous",
    ),
    "seg_rank_short": (
        lambda c: sgmv_expand(
            c.h,
            c.pool.b_pages,
            c.pool.page_table,
            dataclasses.replace(c.meta, seg_rank=c.meta.seg_rank[:-1]),
            c.y,
            WIDTHS,
        ),
        "meta.seg_rank must be",
    ),
}


@pytest.mark.parametrize("name", list(SHRINK_CASES))
def test_shrink_refuses(case: Case, name: str) -> None:
    call, message = SHRINK_CASES[name]
    with pytest.raises(ValueError, match=message):
        call(case)


@pytest.mark.parametrize("name", list(EXPAND_CASES))
def test_expand_refuses(case: Case, name: str) -> None:
    call, message = EXPAND_CASES[name]
    before = case.y.clone()
    with pytest.raises(ValueError, match=message):
        call(case)
    assert torch.equal(case.y, before)


def test_references_refuse_what_the_kernels_refuse(case: Case) -> None:
    with pytest.raises(ValueError, match="page_table rows must be contiguous"):
        sgmv_shrink_ref(case.x, case.pool.a_pages, column_major(case.pool.page_table), case.meta)
    with pytest.raises(ValueError, match="y must be"):
        sgmv_expand_ref(
            case.h, case.pool.b_pages, case.pool.page_table, case.meta, case.y[:, :16], WIDTHS
        )


def test_valid_case_runs(case: Case) -> None:
    """The fixture itself is accepted (so each refusal above is the mutation's doing)."""
    h = sgmv_shrink(case.x, case.pool.a_pages, case.pool.page_table, case.meta, out=case.h)
    y = sgmv_expand(h, case.pool.b_pages, case.pool.page_table, case.meta, case.y, WIDTHS)
    h_ref = sgmv_shrink_ref(case.x, case.pool.a_pages, case.pool.page_table, case.meta)
    y_ref = sgmv_expand_ref(
        h_ref, case.pool.b_pages, case.pool.page_table, case.meta, torch.zeros_like(y), WIDTHS
    )
    torch.testing.assert_close((h, y), (h_ref, y_ref), atol=1e-4, rtol=1e-4)


def test_slice_bounds_are_built_once_per_shape(device: torch.device) -> None:
    bounds = _slice_bounds((4096, 1024, 1024), device)
    assert bounds.dtype == torch.int32 and bounds.device.type == device.type
    assert bounds.cpu().tolist() == [0, 4096, 5120, 6144]
    assert _slice_bounds([4096, 1024, 1024], device) is bounds


OPTIMIZED = """
import torch
from kernels.sgmv_expand import sgmv_expand
from kernels.sgmv_metadata import metadata_from_segments
b_pages = torch.randn(1, 8, 32)
table = torch.zeros(1, 1, dtype=torch.int32)
meta = metadata_from_segments([3], [0], [8], [1.0], device="cpu")
h = torch.randn(1, 3, 8)
big = torch.zeros(3, 64)
try:  # no assert here: -O strips them
    sgmv_expand(h, b_pages, table, meta, big[:, :16], [32])  # y 16 wide, slices 32
    print("launched")
except ValueError as e:
    print("refused:", e)
print("written past y:", bool(big.any()))
"""


def test_checks_survive_python_O() -> None:
    """Under `python -O` a wrong y width must still be refused, not written past."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-O", "-c", OPTIMIZED],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-2:] == [
        "refused: y must be [3, 32], got (3, 16)",
        "written past y: False",
    ], proc.stdout
