"""SGMV metadata builder: segment invariants, fixed buffers, no host sync."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from kernels.sgmv_metadata import SgmvMetadataBuilder, max_segments, metadata_from_segments

NUM_SLOTS = 5
SLOT_RANK = torch.tensor([8, 0, 64, 1, 128], dtype=torch.int32)
SLOT_SCALE = torch.tensor([2.0, 0.0, 0.25, 16.0, 0.125])


def check_segments(rows: list[int], builder: SgmvMetadataBuilder) -> None:
    meta = builder.build(torch.tensor(rows, dtype=torch.int32), SLOT_RANK, SLOT_SCALE)
    t = len(rows)
    assert meta.num_tokens == t
    assert meta.num_segments == max_segments(t, NUM_SLOTS, builder.chunk_size)
    indptr = meta.seg_indptr.tolist()
    token_ids = meta.token_ids.tolist()
    assert indptr[0] == 0 and all(a <= b for a, b in itertools.pairwise(indptr))
    seen: list[int] = []
    for s, adapter in enumerate(meta.seg_adapter.tolist()):
        seg_rows = token_ids[indptr[s] : indptr[s + 1]]
        assert len(seg_rows) <= builder.chunk_size
        if adapter < 0:
            assert seg_rows == [] and meta.seg_rank[s] == 0
            continue
        assert seg_rows, f"segment {s} of slot {adapter} is empty"
        assert all(rows[i] == adapter for i in seg_rows)
        assert meta.seg_rank[s] == SLOT_RANK[adapter]
        assert meta.seg_scale[s] == SLOT_SCALE[adapter]
        seen += seg_rows
    # Every row with a valid adapter exactly once, in stable order; no other row.
    assert seen == sorted(seen, key=lambda i: rows[i])
    assert sorted(seen) == [i for i, a in enumerate(rows) if 0 <= a < NUM_SLOTS]


@pytest.mark.parametrize("chunk_size", [1, 4, 16])
def test_segments_cover_exactly_the_adapter_rows(chunk_size: int) -> None:
    builder = SgmvMetadataBuilder(
        max_tokens=300, num_slots=NUM_SLOTS, chunk_size=chunk_size, device="cpu"
    )
    rng = random.Random(chunk_size)
    cases = [
        [3],
        [-1],
        [-1] * 7,
        [0] * 300,
        [4, -1, 4, 99, 0, -3, 5],  # ids outside [0, num_slots) are "no adapter"
        list(range(NUM_SLOTS)) * 3,
        [0] * (chunk_size + 1) + [2] * chunk_size + [1] * (2 * chunk_size + 1),  # bound is tight
    ]
    cases += [
        [rng.randrange(-1, NUM_SLOTS) for _ in range(rng.randrange(1, 300))] for _ in range(20)
    ]
    for rows in cases:
        check_segments(rows, builder)


def test_buffers_are_reused_and_shapes_depend_only_on_token_count() -> None:
    builder = SgmvMetadataBuilder(max_tokens=64, num_slots=NUM_SLOTS, device="cpu")
    a = builder.build(torch.full((40,), -1), SLOT_RANK, SLOT_SCALE)
    ptrs = [t.data_ptr() for t in (a.token_ids, a.seg_indptr, a.seg_adapter, a.seg_rank)]
    a_adapters = a.seg_adapter.tolist()  # views: the next build overwrites them
    b = builder.build(torch.arange(40) % NUM_SLOTS, SLOT_RANK, SLOT_SCALE)
    assert [t.data_ptr() for t in (b.token_ids, b.seg_indptr, b.seg_adapter, b.seg_rank)] == ptrs
    assert a.seg_indptr.shape == b.seg_indptr.shape
    assert a_adapters == [-1] * a.num_segments
    assert b.seg_adapter.tolist()[:NUM_SLOTS] == list(range(NUM_SLOTS))


def test_build_needs_no_host_values() -> None:
    """On the meta device any .item()/.tolist()/data-dependent shape raises: building there
    proves the step path can be captured in a CUDA graph."""
    builder = SgmvMetadataBuilder(max_tokens=64, num_slots=NUM_SLOTS, device="meta")
    meta = builder.build(
        torch.empty(33, dtype=torch.int32, device="meta"),
        torch.empty(NUM_SLOTS, dtype=torch.int32, device="meta"),
        torch.empty(NUM_SLOTS, device="meta"),
    )
    assert meta.seg_indptr.shape == (max_segments(33, NUM_SLOTS, 16) + 1,)


def test_with_rank_pads_active_segments_only() -> None:
    builder = SgmvMetadataBuilder(max_tokens=8, num_slots=NUM_SLOTS, device="cpu")
    meta = builder.build(torch.tensor([0, 3, -1]), SLOT_RANK, SLOT_SCALE).with_rank(128)
    assert meta.seg_rank.tolist() == [128, 128, 0]


def test_metadata_from_segments_keeps_empty_and_long_segments() -> None:
    meta = metadata_from_segments(
        [2, 0, 70, 1], [0, 2, 4, -1], SLOT_RANK.tolist(), SLOT_SCALE.tolist(), device="cpu"
    )
    assert meta.seg_indptr.tolist() == [0, 2, 2, 72, 73]
    assert meta.seg_rank.tolist() == [8, 64, 128, 0]
    assert meta.num_tokens == 73 and meta.max_seg_len == 70
