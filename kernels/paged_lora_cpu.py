"""LoRA delta over the paged pool in plain torch: the CPU path of the paged vLLM layers.

    y[t, c_i : c_i + w_i] += s_a · (x[t] · A_{a,i}[:r_a]ᵀ) · B_{a,i}[:r_a]     a = slot[t] >= 0

Rows whose slot is -1 (no adapter) are not touched: they get exactly zero delta whatever the
pool holds, the property vLLM 0.32's own CPU ops lacked (see kernels.cpu_lora_ops).

On a CPU the cost of this op is the number of torch calls, not the arithmetic (the decode
batch of a tiny model is a few hundred kFLOP per adapter). So the step's rows are split once
(`kernels.paged_step_rows.split_rows`, shared by every layer of the step):
- an adapter with many rows (a prefill) gets its own pair of GEMMs at its own rank;
- every other row goes into one batched pass over the pages of the adapters present: one
  GEMM of those rows against all those pages' A rows, a mask that keeps each row's own
  pages (and folds in its slot's scale), one GEMM per slice against the same pages' B rows.
  The order of rank rows does not matter to the sum, so pages need no reordering, and rows
  past an adapter's rank are zero in its last page (PagedLoraPool.load pads them), so they
  add nothing. The call count no longer grows with the number of adapters in the batch.
This reads index tensors on the host: fine on CPU, where vLLM runs LoRA models eagerly (it
disables compilation when LoRA is on); CUDA uses kernels.sgmv_*.

Layout and shapes are those of kernels.paged_pool:
    x          [T, H_in]
    y          [T, H_out], updated in place (H_out = sum of slice_widths)
    a_pages    [num_pages, num_slices, P, H_in]
    b_pages    [num_pages, P, H_out]
    page_table [num_slots, max_pages] int32, slot_rank [num_slots], slot_scale [num_slots]
    token_slot [T'] integer, T' <= T; rows past T' have no adapter
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels.paged_pool import PagedLoraPool
from kernels.paged_step_rows import StepRows, set_apart, split_rows

# With the pool's page owners at hand, the batched pass reads the whole pool in place, unless
# the work spent on pages the step's adapters do not own is larger than what gathering the
# ones they do own costs in calls: it does once the adapters hold at least this share of the
# pool, or while that wasted work stays under this many multiply-adds (~0.1 ms on 2 cores,
# about the cost of the gather's extra calls; benchmarks/kernels/bench_paged_cpu.py measured
# the whole pool 1.3-2.6x faster with 38-100 % of the demo pool held).
WHOLE_POOL_MIN_SHARE = 0.5
WHOLE_POOL_MAX_WASTED_MACS = 4_000_000


def _check(
    y: torch.Tensor,
    x: torch.Tensor,
    a_pages: torch.Tensor,
    b_pages: torch.Tensor,
    page_table: torch.Tensor,
    token_slot: torch.Tensor,
    slice_widths: Sequence[int],
) -> None:
    assert x.dim() == 2 and y.dim() == 2, f"x, y must be 2-D, got {x.shape}, {y.shape}"
    assert x.shape[0] == y.shape[0], f"x has {x.shape[0]} rows, y {y.shape[0]}"
    assert token_slot.dim() == 1 and token_slot.shape[0] <= x.shape[0], (
        f"token_slot must be [<= {x.shape[0]}], got {tuple(token_slot.shape)}"
    )
    assert a_pages.dim() == 4 and a_pages.shape[1] == len(slice_widths), (
        f"a_pages must be [pages, {len(slice_widths)}, P, H_in], got {tuple(a_pages.shape)}"
    )
    assert a_pages.shape[3] == x.shape[1], f"H_in: x {x.shape[1]}, A {a_pages.shape[3]}"
    assert b_pages.shape == (a_pages.shape[0], a_pages.shape[2], sum(slice_widths)), (
        f"b_pages must be [{a_pages.shape[0]}, {a_pages.shape[2]}, {sum(slice_widths)}], "
        f"got {tuple(b_pages.shape)}"
    )
    assert y.shape[1] == sum(slice_widths), f"y has {y.shape[1]} columns, slices sum to more"
    assert page_table.dim() == 2, f"page_table must be [slots, max_pages], got {page_table.shape}"


def _mapped_pages(page_table: torch.Tensor, slot: int, rank: int, page_size: int) -> torch.Tensor:
    """int64 pages holding `slot`'s rank rows; refuses a rank whose pages are not all mapped."""
    pages = page_table[slot, : -(-rank // page_size)].to(torch.int64)
    # A slot with a rank but an unmapped page means the pool's bookkeeping broke: refuse
    # rather than read whatever a free page holds.
    if bool((pages < 0).any()):
        raise RuntimeError(f"slot {slot} has rank {rank} but unmapped pages {pages.tolist()}")
    return pages


def paged_lora_linear_cpu(
    y: torch.Tensor,
    x: torch.Tensor,
    a_pages: torch.Tensor,
    b_pages: torch.Tensor,
    page_table: torch.Tensor,
    slot_rank: torch.Tensor,
    slot_scale: torch.Tensor,
    token_slot: torch.Tensor,
    slice_widths: Sequence[int],
    *,
    rows: StepRows | None = None,
    page_owner: torch.Tensor | None = None,
    nonfinite_slots: frozenset[int] = frozenset(),
) -> torch.Tensor:
    """Add every row's own adapter delta to y (see module docstring); returns y.

    rows: `split_rows(token_slot, num_slots)` when the caller already has it (it is the same
    for every layer of one step). Accumulation is fp32; y is rounded once.
    page_owner: the pool's [num_pages] slot per page (-1 = free). With it, a batched pass
    whose adapters hold at least half the pool runs over the whole pool in place, masked by
    owner, instead of first gathering the pages it needs.
    nonfinite_slots: slots whose pages hold inf or NaN (`PagedLoraPool.nonfinite_slots`).
    The batched pass multiplies every row by the zeros its mask leaves on other adapters'
    rank rows, and 0 x inf = NaN: those adapters' rows get GEMMs of their own instead, and
    the pass never reads the whole pool while one is resident.
    """
    _check(y, x, a_pages, b_pages, page_table, token_slot, slice_widths)
    if rows is None:
        rows = split_rows(token_slot, page_table.shape[0])
    if nonfinite_slots:
        rows = set_apart(rows, nonfinite_slots)
        page_owner = None
    if rows.empty:
        return y
    bounds = [0]
    for w in slice_widths:
        bounds.append(bounds[-1] + int(w))
    max_rank = page_table.shape[1] * a_pages.shape[2]
    ranks = [min(int(r), max_rank) for r in slot_rank.tolist()]
    scales = slot_scale.tolist()
    for slot, slot_rows in rows.own:
        if ranks[slot] > 0:  # an empty slot contributes nothing
            _own_gemms(
                y,
                x,
                a_pages,
                b_pages,
                page_table,
                slot,
                slot_rows,
                ranks[slot],
                scales[slot],
                bounds,
            )
    if rows.batched_rows.numel():
        # One number when the step's adapters share a scale (vLLM folds the scale into B, so
        # in the engine it is always 1.0); slots without rows in this layer (rank 0: an MLP
        # adapter in an attention layer) own no page and do not count.
        held_scales = {scales[s] for s in rows.batched_present_slots if ranks[s] > 0}
        step_scale = held_scales.pop() if len(held_scales) == 1 else None
        page_size, num_pages = a_pages.shape[2], a_pages.shape[0]
        held = sum(-(-ranks[s] // page_size) for s in rows.batched_present_slots)
        per_row = page_size * (a_pages.shape[1] * a_pages.shape[3] + b_pages.shape[2])
        wasted = rows.batched_rows.numel() * max(num_pages - held, 0) * per_row
        if page_owner is not None and (
            held >= WHOLE_POOL_MIN_SHARE * num_pages or wasted <= WHOLE_POOL_MAX_WASTED_MACS
        ):
            every_row = rows.batched_all_rows and token_slot.shape[0] == x.shape[0]
            _batched_whole_pool(
                y, x, a_pages, b_pages, page_owner, slot_scale, step_scale, rows, bounds, every_row
            )
        else:
            _batched(
                y, x, a_pages, b_pages, page_table, slot_scale, step_scale, ranks, rows, bounds
            )
    return y


def paged_lora_pool_cpu(
    y: torch.Tensor,
    x: torch.Tensor,
    pool: PagedLoraPool,
    token_slot: torch.Tensor,
    *,
    rows: StepRows | None = None,
    whole_pool: bool = True,
) -> torch.Tensor:
    """`paged_lora_linear_cpu` over one pool's tensors; whole_pool=False never reads the whole
    pool (the batched pass always gathers the pages it needs)."""
    return paged_lora_linear_cpu(
        y,
        x,
        pool.a_pages,
        pool.b_pages,
        pool.page_table,
        pool.slot_rank,
        pool.slot_scale,
        token_slot,
        pool.slice_widths,
        rows=rows,
        page_owner=pool.page_owner if whole_pool else None,
        nonfinite_slots=pool.nonfinite_slots,
    )


def _own_gemms(
    y: torch.Tensor,
    x: torch.Tensor,
    a_pages: torch.Tensor,
    b_pages: torch.Tensor,
    page_table: torch.Tensor,
    slot: int,
    rows: torch.Tensor,
    rank: int,
    scale: float,
    bounds: list[int],
) -> None:
    n_slices, page_size, h_in = a_pages.shape[1], a_pages.shape[2], a_pages.shape[3]
    pages = _mapped_pages(page_table, slot, rank, page_size)
    n_pages = pages.numel()
    # [n, S, P, H_in] -> [S, n·P, H_in]: rank row j sits in page j // P at row j % P.
    a = a_pages[pages].transpose(0, 1).reshape(n_slices, n_pages * page_size, h_in)
    b = b_pages[pages].reshape(n_pages * page_size, -1)[:rank].float()
    xs = x[rows].float()
    h = torch.einsum("th,srh->str", xs, a[:, :rank].float()) * scale
    delta = torch.cat([h[i] @ b[:, bounds[i] : bounds[i + 1]] for i in range(n_slices)], dim=1)
    _add_rows(y, rows, delta)


def _batched(
    y: torch.Tensor,
    x: torch.Tensor,
    a_pages: torch.Tensor,
    b_pages: torch.Tensor,
    page_table: torch.Tensor,
    slot_scale: torch.Tensor,
    step_scale: float | None,
    ranks: list[int],
    rows: StepRows,
    bounds: list[int],
) -> None:
    n_slices, page_size, h_in = a_pages.shape[1], a_pages.shape[2], a_pages.shape[3]
    # The pages of the adapters present and, for each, the slot that owns it; checked like
    # _mapped_pages, in one pass over the present slots' page-table rows.
    present = rows.batched_present
    table = page_table[present].to(torch.int64)  # [K, max_pages]
    rank = torch.tensor([ranks[s] for s in present.tolist()], dtype=torch.int64)
    needed = torch.arange(table.shape[1])[None, :] < (-(-rank // page_size))[:, None]
    if bool((needed & (table < 0)).any()):
        bad = present[(needed & (table < 0)).any(dim=1)].tolist()
        raise RuntimeError(f"slots {bad} have a rank but unmapped pages")
    if not bool(needed.any()):  # only rank-0 slots: nothing to add
        return
    pages = table[needed]
    owner = present[:, None].expand_as(table)[needed]
    n_used = pages.numel()
    a = a_pages[pages].reshape(n_used * n_slices * page_size, h_in).float()
    b = b_pages[pages].reshape(n_used * page_size, -1).float()
    xs = x[rows.batched_rows].float()
    not_own = owner[None, :] != rows.batched_slots[:, None]  # rank-0 slots own no page
    per_slice = _own_pages_per_slice(xs @ a.t(), not_own, slot_scale, step_scale, rows, page_size)
    delta = torch.cat(
        [per_slice[i] @ b[:, bounds[i] : bounds[i + 1]] for i in range(n_slices)], dim=1
    )
    _add_rows(y, rows.batched_rows, delta)


def _own_pages_per_slice(
    h: torch.Tensor,
    not_own: torch.Tensor,
    slot_scale: torch.Tensor,
    step_scale: float | None,
    rows: StepRows,
    page_size: int,
) -> torch.Tensor:
    """The shrink's output h [T, U·S·P] (row t against rank row p of page u, slice s), kept
    only where row t's slot owns page u (not_own [T, U] is False) and scaled by that slot's
    scale, as [S, T, U·P]: each slice's rows are a plain 2-D view for its expand GEMM.
    step_scale: the one scale every row's adapter shares, or None to gather it per row.

    One multiply writes the slice-major layout and applies the scale; one fill clears the
    pages the row does not own. Filled, not multiplied by a 0/1 mask: inf x 0 would carry
    another adapter's overflow into this row as NaN. (Two ops where a torch.where over the
    page-major layout, its scale gather and a permuting copy took five: 217 -> 128 us with
    the 109 us GEMM, 16 rows over 64 q/k/v pages, one core.)
    """
    t, u = not_own.shape
    n_slices = h.shape[1] // (u * page_size)
    out = torch.empty(n_slices, t, u, page_size, dtype=torch.float32, device=h.device)
    page_major = h.view(t, u, n_slices, page_size).permute(2, 0, 1, 3)
    if step_scale is not None:
        torch.mul(page_major, step_scale, out=out)
    else:
        row_scale = slot_scale.to(torch.float32)[rows.batched_slots]
        torch.mul(page_major, row_scale[None, :, None, None], out=out)
    out.masked_fill_(not_own[None, :, :, None], 0.0)
    return out.view(n_slices, t, u * page_size)


def _add_rows(y: torch.Tensor, rows: torch.Tensor, delta: torch.Tensor) -> None:
    """y[rows] += delta (fp32), rounding y once.

    An fp32 y takes one `index_add_`, which adds row by row on one thread. The gather, add and
    scatter it replaces are each split across vLLM's OpenMP threads once a prefill makes them
    large enough, and with a busy core every split waits for the descheduled thread: that one
    line was 34 % of the worker's time in a profile of the residency benchmark.
    """
    if y.dtype == torch.float32:
        y.index_add_(0, rows, delta)
    else:
        y.index_copy_(0, rows, (y[rows].float() + delta).to(y.dtype))


def _batched_whole_pool(
    y: torch.Tensor,
    x: torch.Tensor,
    a_pages: torch.Tensor,
    b_pages: torch.Tensor,
    page_owner: torch.Tensor,
    slot_scale: torch.Tensor,
    step_scale: float | None,
    rows: StepRows,
    bounds: list[int],
    every_row: bool,
) -> None:
    """`_batched` over every page of the pool, read in place: no gather, no page-table walk.

    A page counts for a row only if the row's slot owns it. The mask fills (masked_fill_)
    rather than multiplies, so whatever another tenant's or a free page yields for this row,
    even inf, never reaches it: the row's delta is exactly its own adapter's.
    every_row: the pass covers all rows of x and y in order (a decode step), so x is read and
    an fp32 y is updated in place, slice by slice, without gathering or scattering rows.
    """
    num_pages, n_slices, page_size, h_in = a_pages.shape
    a = a_pages.view(num_pages * n_slices * page_size, h_in)
    b = b_pages.view(num_pages * page_size, -1).float()
    xs = x if every_row else x[rows.batched_rows]
    not_own = page_owner[None, :] != rows.batched_slots[:, None]
    h = xs.float() @ a.float().t()
    per_slice = _own_pages_per_slice(h, not_own, slot_scale, step_scale, rows, page_size)
    if every_row and y.dtype == torch.float32:
        for i in range(n_slices):
            lo, hi = bounds[i], bounds[i + 1]
            y[:, lo:hi].addmm_(per_slice[i], b[:, lo:hi])
        return
    delta = torch.cat(
        [per_slice[i] @ b[:, bounds[i] : bounds[i + 1]] for i in range(n_slices)], dim=1
    )
    if every_row:
        y.copy_((y.float() + delta).to(y.dtype))
    else:
        _add_rows(y, rows.batched_rows, delta)
