"""Residency: which adapters to page out so another fits, and when to refuse."""

from __future__ import annotations

import pytest

from kernels.paged_residency import AdapterTooLarge, PoolExhausted, Residency


def pool(*held: tuple[int, int], num_pages: int = 10) -> Residency:
    res = Residency(num_pages, page_size=4)
    for adapter, pages in held:
        res.admit(adapter, pages)
    return res


def test_pages_follow_rank_not_the_maximum():
    res = Residency(10, page_size=4)
    assert [res.pages_for_rank(r) for r in (0, 1, 4, 5, 64)] == [0, 1, 1, 2, 16]


def test_fits_without_eviction_when_free():
    res = pool((1, 3), (2, 3))
    assert res.plan_admit(3, 4, protected=set()) == []


def test_evicts_least_recently_used_first_and_only_as_many_as_needed():
    res = pool((1, 3), (2, 3), (3, 3))  # 1 page free
    res.touch(1)  # LRU order now 2, 3, 1
    assert res.plan_admit(4, 3, protected=set()) == [2]
    assert res.plan_admit(4, 6, protected=set()) == [2, 3]


def test_never_evicts_the_running_batch():
    res = pool((1, 3), (2, 3), (3, 3))
    assert res.plan_admit(4, 4, protected={1, 2}) == [3]
    with pytest.raises(PoolExhausted, match=r"needs 5 pages, 4 pages can be freed"):
        res.plan_admit(4, 5, protected={1, 2})


def test_reloading_an_adapter_counts_its_own_pages_as_free():
    res = pool((1, 6), (2, 4))  # full
    assert res.plan_admit(1, 6, protected={1, 2}) == []


def test_an_adapter_larger_than_the_pool_is_refused_outright():
    with pytest.raises(AdapterTooLarge, match="needs 11 pages"):
        pool().plan_admit(1, 11, protected=set())


def test_admit_and_release_keep_the_count():
    res = pool((1, 3), (2, 0))  # a zero-weight (warm-up) adapter holds no pages
    assert res.pages_used == 3 and res.resident() == [1, 2]
    assert res.release(1) == 3 and res.release(1) == 0
    assert res.pages_free == 10 and res.resident() == [2]
    with pytest.raises(AssertionError):
        res.admit(3, 11)


def grouped(*held: tuple[int, tuple[int, ...]], totals=(8, 4, 4)) -> Residency:
    res = Residency(totals, page_size=4, names=("qkv_proj", "o_proj", "gate_up_proj"))
    for adapter, pages in held:
        res.admit(adapter, pages)
    return res


def test_groups_are_separate_budgets():
    # a q/v adapter and an MLP adapter share no group: both fit beside each other
    res = grouped((1, (8, 0, 0)))
    assert res.plan_admit(2, (0, 0, 4), protected=set()) == []
    res.admit(2, (0, 0, 4))
    assert res.used == (8, 0, 4) and res.pages_used == 12 and res.pages_free == 4


def test_a_victim_is_taken_only_where_it_frees_a_short_group():
    # attention is full with 1 (LRU) and 3; the MLP adapter 2 sits between them in LRU order
    res = grouped((1, (4, 2, 0)), (2, (0, 0, 4)), (3, (4, 2, 0)))
    # 4 needs attention pages only: paging out 2 would free nothing there
    assert res.plan_admit(4, (4, 2, 0), protected=set()) == [1]
    assert res.plan_admit(4, (8, 0, 0), protected=set()) == [1, 3]


def test_a_group_too_small_for_the_adapter_refuses_it_and_names_the_group():
    with pytest.raises(AdapterTooLarge, match="5 o_proj"):
        grouped().plan_admit(1, (0, 5, 0), protected=set())
    res = grouped((1, (8, 0, 0)))
    with pytest.raises(PoolExhausted, match="needs 1 qkv_proj, 0 o_proj, 0 gate_up_proj"):
        res.plan_admit(2, (1, 0, 0), protected={1})
