"""LoRA delta over the paged pool in plain torch: the CPU path of the paged vLLM layers.

    y[t, c_i : c_i + w_i] += s_a · (x[t] · A_{a,i}[:r_a]ᵀ) · B_{a,i}[:r_a]     a = slot[t] >= 0

Rows whose slot is -1 (no adapter) are not touched: they get exactly zero delta whatever the
pool holds, the property vLLM 0.32's own CPU ops lacked (see kernels.cpu_lora_ops).

The batch is grouped by slot once per step (`group_rows_by_slot`) and each adapter's pages are
gathered once per layer, so the work is one pair of GEMMs per adapter present, at the
adapter's own rank. This reads index tensors on the host: fine on CPU, where vLLM runs LoRA
models eagerly (it disables compilation when LoRA is on); CUDA uses kernels.sgmv_*.

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

SlotGroups = list[tuple[int, torch.Tensor]]


def group_rows_by_slot(token_slot: torch.Tensor, num_slots: int) -> SlotGroups:
    """[(slot, rows)] for each slot that has rows, rows as int64 indices in ascending order.

    Rows marked -1, or with any id outside [0, num_slots), belong to no group.
    """
    ids = token_slot.to(device="cpu", dtype=torch.int64)
    valid = (ids >= 0) & (ids < num_slots)
    rows = torch.nonzero(valid).squeeze(1)
    if rows.numel() == 0:
        return []
    slots, order = torch.sort(ids[rows], stable=True)
    present, counts = torch.unique_consecutive(slots, return_counts=True)
    grouped = rows[order].split(counts.tolist())
    return [
        (int(s), r.to(token_slot.device)) for s, r in zip(present.tolist(), grouped, strict=True)
    ]


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
    groups: SlotGroups | None = None,
) -> torch.Tensor:
    """Add every row's own adapter delta to y (see module docstring); returns y.

    groups: `group_rows_by_slot(token_slot, num_slots)` when the caller already has it (it is
    the same for every layer of one step). Accumulation is fp32; y is rounded once.
    """
    _check(y, x, a_pages, b_pages, page_table, token_slot, slice_widths)
    if groups is None:
        groups = group_rows_by_slot(token_slot, page_table.shape[0])
    n_slices, page_size, h_in = a_pages.shape[1], a_pages.shape[2], a_pages.shape[3]
    max_rank = page_table.shape[1] * page_size
    bounds = [0]
    for w in slice_widths:
        bounds.append(bounds[-1] + int(w))
    ranks = slot_rank.tolist()
    scales = slot_scale.tolist()
    for slot, rows in groups:
        rank = min(int(ranks[slot]), max_rank)
        if rank <= 0:  # an empty slot contributes nothing
            continue
        n_pages = -(-rank // page_size)
        pages = page_table[slot, :n_pages].to(torch.int64)
        # A slot with a rank but an unmapped page means the pool's bookkeeping broke: refuse
        # rather than read whatever a free page holds.
        if bool((pages < 0).any()):
            raise RuntimeError(f"slot {slot} has rank {rank} but unmapped pages {pages.tolist()}")
        # [n, S, P, H_in] -> [S, n·P, H_in]: rank row j sits in page j // P at row j % P.
        a = a_pages[pages].transpose(0, 1).reshape(n_slices, n_pages * page_size, h_in)
        b = b_pages[pages].reshape(n_pages * page_size, -1)[:rank].float()
        xs = x[rows].float()
        h = torch.einsum("th,srh->str", xs, a[:, :rank].float()) * scales[slot]
        delta = torch.cat([h[i] @ b[:, bounds[i] : bounds[i + 1]] for i in range(n_slices)], dim=1)
        y[rows] = (y[rows].float() + delta).to(y.dtype)
    return y
