"""Rows of one step grouped by slot and split for the CPU path (kernels.paged_step_rows)."""

from __future__ import annotations

import torch

from kernels.paged_step_rows import group_rows_by_slot, set_apart, split_rows


def test_groups_cover_each_valid_row_once_in_order() -> None:
    slots = torch.tensor([3, -1, 0, 3, 7, 0, 0, -1, 3])
    groups = group_rows_by_slot(slots, num_slots=4)  # 7 is out of range: no adapter
    assert [(s, r.tolist()) for s, r in groups] == [(0, [2, 5, 6]), (3, [0, 3, 8])]
    assert group_rows_by_slot(torch.full((3,), -1), num_slots=4) == []


def test_split_keeps_every_valid_row_once() -> None:
    slots = torch.tensor([3, -1, 0, 3, 7, 0, 0, -1, 3, 3])
    rows = split_rows(slots, num_slots=4, own_gemm_rows=4)  # slot 3 has 4 rows: own GEMMs
    assert [(s, r.tolist()) for s, r in rows.own] == [(3, [0, 3, 8, 9])]
    assert rows.batched_rows.tolist() == [2, 5, 6]
    assert rows.batched_slots.tolist() == [0, 0, 0]
    assert rows.batched_present.tolist() == [0]
    assert split_rows(torch.full((3,), -1), num_slots=4).empty


def test_set_apart_moves_a_slots_batched_rows_to_own_gemms_and_leaves_the_input() -> None:
    """Adapters with non-finite weights leave the batched pass (kernels.paged_lora_cpu); the
    split is cached for every layer of the step, so it must come back as a new object."""
    slots = torch.tensor([2, 0, 1, 2, -1, 0, 2])
    rows = split_rows(slots, num_slots=4)
    before = (rows.batched_rows.tolist(), rows.batched_slots.tolist(), rows.own)
    apart = set_apart(rows, frozenset({2, 3}))
    assert (rows.batched_rows.tolist(), rows.batched_slots.tolist(), rows.own) == before
    assert [(s, r.tolist()) for s, r in apart.own] == [(2, [0, 3, 6])]
    assert apart.batched_rows.tolist() == [1, 2, 5]
    assert apart.batched_slots.tolist() == [0, 1, 0]
    assert apart.batched_present.tolist() == [0, 1] and apart.batched_present_slots == (0, 1)
    assert rows.batched_all_rows is False and apart.batched_all_rows is False
    assert set_apart(rows, frozenset({3})) is rows  # nothing of slot 3 in this step
