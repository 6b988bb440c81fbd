"""The admission plan on synthetic queues: the page budget binds, an adapter already in the
step costs nothing, an admitted adapter brings its whole group, requests without an adapter
always pass, and a request that waited too long goes first and blocks newcomers."""

from __future__ import annotations

import json

import pytest

from kernels.paged_admission import AdmissionPlanner, Waiting, adapter_rank, pages_for_rank

NOW = 100.0


def w(name: str, adapter: int, pages: int, age: float = 0.0) -> Waiting:
    return Waiting(name, adapter, pages, NOW - age)


def names(items: list[Waiting]) -> list[str]:
    return [str(i.key) for i in items]


def plan(total: int, running: dict[int, int], waiting: list[Waiting], max_wait_s: float = 2.0):
    return AdmissionPlanner(total_pages=total, max_wait_s=max_wait_s).plan(running, waiting, NOW)


def test_the_page_budget_binds_beside_the_running_adapters():
    result = plan(6, {1: 2}, [w("a", 2, 3), w("b", 3, 4), w("c", 4, 1)])
    assert names(result.order) == ["a", "c"]  # 2 + 3 + 1 = 6; b's 4 pages do not fit
    assert names(result.held) == ["b"] and result.held_adapters == {3}


def test_adapters_already_in_the_step_and_base_requests_go_first_and_free():
    result = plan(4, {5: 4}, [w("new", 6, 1), w("base", 0, 0), w("same", 5, 4)])
    assert names(result.order) == ["base", "same"]  # the pool is full with adapter 5
    assert names(result.held) == ["new"]


def test_an_admitted_adapter_brings_all_its_waiting_requests():
    result = plan(8, {}, [w("x1", 2, 4), w("y1", 3, 4), w("x2", 2, 4), w("z", 4, 1)])
    assert names(result.order) == ["x1", "x2", "y1"]
    assert names(result.held) == ["z"]


def test_a_request_that_waited_too_long_goes_first_and_blocks_newcomers():
    fits = plan(4, {1: 2}, [w("young", 2, 2), w("old", 3, 2, age=5)])
    assert names(fits.order) == ["old"] and names(fits.held) == ["young"]  # 2 + 2 = 4: old wins
    blocked = plan(4, {1: 2}, [w("young", 2, 1), w("old", 3, 3, age=5), w("base", 0, 0)])
    # old does not fit until adapter 1's requests finish; young would fit but must not take
    # the pages that free up first
    assert names(blocked.order) == ["base"]
    assert names(blocked.held) == ["young", "old"]


def test_without_long_waits_adapters_come_in_arrival_order_each_with_its_group():
    queue = [w(f"r{i}", i % 3 + 1, 1) for i in range(6)]
    assert names(plan(10, {}, queue).order) == ["r0", "r3", "r1", "r4", "r2", "r5"]


@pytest.mark.parametrize(("rank", "size", "pages"), [(1, 4, 1), (4, 4, 1), (5, 4, 2), (64, 4, 16)])
def test_pages_for_rank(rank, size, pages):
    assert pages_for_rank(rank, size) == pages


def test_adapter_rank_reads_the_widest_declared_rank(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "rank_pattern": {"q": 24}}))
    assert adapter_rank(tmp_path) == 24
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 0}))
    with pytest.raises(ValueError, match="no positive rank"):
        adapter_rank(tmp_path)


def test_with_pool_groups_an_adapter_fits_when_it_fits_every_group():
    # groups (attention, mlp) of 8 and 4 pages; adapter 1 runs with q/v pages only
    running = {1: (8, 0)}
    queue = [w("attn", 2, (2, 0)), w("mlp", 3, (0, 4)), w("both", 4, (2, 2))]
    result = AdmissionPlanner(total_pages=(8, 4), max_wait_s=2.0).plan(running, queue, NOW)
    # attention is full: only the MLP-only adapter joins, in any total of pages it would
    assert names(result.order) == ["mlp"] and names(result.held) == ["attn", "both"]


def test_while_an_aged_request_waits_for_pages_the_running_adapters_take_no_new_requests():
    """Requests for a running adapter cost no page, but admitting them kept it running: under
    a steady stream to it, an aged request that needs its pages waited forever (review)."""
    queue = [w("big", 9, 5, age=5), w("stream", 1, 5), w("base", 0, 0)]
    draining = plan(8, {1: 5}, queue)
    assert names(draining.order) == ["base"]  # adapter 1 drains; its pages go to big next
    assert names(draining.held) == ["big", "stream"]
    young = [w("big", 9, 5, age=1), w("stream", 1, 5), w("base", 0, 0)]
    assert names(plan(8, {1: 5}, young).order) == ["stream", "base"]  # not aged: no drain
    assert names(plan(8, {}, queue).order) == ["big", "base"]  # drained: big first
