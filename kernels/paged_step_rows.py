"""One step's rows with an adapter, grouped by slot and split by how the CPU path computes
their LoRA delta (kernels.paged_lora_cpu): computed once per step and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SlotGroups = list[tuple[int, torch.Tensor]]

# An adapter with at least this many rows in a step gets GEMMs of its own: there the per-call
# overhead is small next to the work, and the batched pass would multiply these rows by every
# other adapter's pages too. Measured on 2 Xeon cores (benchmarks/kernels/bench_paged_cpu.py).
OWN_GEMM_ROWS = 32


@dataclass(frozen=True)
class StepRows:
    """One step's rows with an adapter, split by how their delta is computed."""

    own: SlotGroups  # (slot, rows) for adapters with >= OWN_GEMM_ROWS rows
    batched_rows: torch.Tensor  # int64 rows of every other adapter, ascending
    batched_slots: torch.Tensor  # int64 slot of each of those rows
    batched_present: torch.Tensor  # int64 distinct slots among them, ascending
    batched_present_slots: tuple[int, ...] = ()  # the same slots, on the host
    # every row of token_slot is in the batched pass (a decode step): rows are 0..T'-1
    batched_all_rows: bool = False

    @property
    def empty(self) -> bool:
        return not self.own and self.batched_rows.numel() == 0


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


def split_rows(
    token_slot: torch.Tensor, num_slots: int, *, own_gemm_rows: int = OWN_GEMM_ROWS
) -> StepRows:
    """Rows with an adapter, split into per-adapter GEMM groups and the batched rest."""
    own: SlotGroups = []
    batched: SlotGroups = []
    for slot, rows in group_rows_by_slot(token_slot, num_slots):
        (own if rows.numel() >= own_gemm_rows else batched).append((slot, rows))
    device = token_slot.device
    if not batched:
        none = torch.empty(0, dtype=torch.int64, device=device)
        return StepRows(own, none, none, none, ())
    rows = torch.cat([r for _, r in batched])
    slots = torch.cat([torch.full_like(r, s) for s, r in batched])
    rows, order = torch.sort(rows)  # ascending rows read and write y in memory order
    present_slots = tuple(s for s, _ in batched)
    present = torch.tensor(present_slots, dtype=torch.int64, device=device)
    all_rows = not own and rows.numel() == token_slot.shape[0]
    return StepRows(own, rows, slots[order], present, present_slots, all_rows)


def set_apart(rows: StepRows, slots: frozenset[int]) -> StepRows:
    """`rows` with the batched rows of `slots` moved to GEMMs of their own."""
    moved = [s for s in rows.batched_present_slots if s in slots]
    if not moved:
        return rows
    own = list(rows.own)
    keep = torch.ones_like(rows.batched_rows, dtype=torch.bool)
    for slot in moved:
        mine = rows.batched_slots == slot
        own.append((slot, rows.batched_rows[mine]))
        keep &= ~mine
    present = tuple(s for s in rows.batched_present_slots if s not in slots)
    return StepRows(
        own,
        rows.batched_rows[keep],
        rows.batched_slots[keep],
        torch.tensor(present, dtype=torch.int64, device=rows.batched_rows.device),
        present,
        False,
    )
