"""The paged manager's own bookkeeping, driven directly over fake paged layers: what a failure
half way through an activation leaves, which adapter a full set of slots gives up, and pinning
(each found by review)."""

from __future__ import annotations

import pytest

import kernels.paged_lora_manager as plm
from tests.kernels.paged_manager_harness import (
    check_served,
    ledger,
    make_lora,
    make_manager,
    pool_pages_used,
    register,
    req,
    worker,
)

PAGE_BYTES = 8192  # one page of rank rows per group at the harness's widths


@pytest.fixture(autouse=True)
def _restore_config():
    saved = plm._config
    yield
    plm._config = saved


def test_a_failure_half_way_through_an_activation_leaves_nothing_behind(monkeypatch):
    """set_lora raising in a later layer (a CUDA OOM on a staging copy, say) left the adapter
    active in its slot with some layers' weights, outside the ledger: a retried add_lora then
    returned True and served it half loaded, and the pools held pages the ledger called free."""
    mgr = make_manager(pool_bytes=PAGE_BYTES * 10, max_loras=4)
    adapter = make_lora(1, {"qkv_proj": 4, "o_proj": 4})
    load = worker(mgr, {1: adapter})
    failing = mgr.paged_modules["model.layers.1.o_proj"]

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(failing, "set_lora", out_of_memory)
    for _ in range(2):  # the gateway retries the load: refused again, never half served
        with pytest.raises(RuntimeError, match="out of memory"):
            load.add_adapter(req(1))
        assert 1 not in mgr._active_adapters and 1 not in mgr.lora_index_to_id
        assert ledger(mgr) == pool_pages_used(mgr) == dict.fromkeys(ledger(mgr), 0)
    monkeypatch.undo()
    assert load.add_adapter(req(1))
    assert check_served(mgr, adapter) == []
    assert ledger(mgr) == pool_pages_used(mgr)


def test_an_adapter_whose_tensors_exceed_max_lora_rank_is_refused_before_any_layer():
    # vLLM checks the config's r only; rank-24 tensors under max_lora_rank 16 failed in the
    # second layer's set_lora, half loaded.
    mgr = make_manager(pool_bytes=PAGE_BYTES * 10, max_loras=4, max_rank=16)
    load = worker(mgr, {1: make_lora(1, {"qkv_proj": 4, "o_proj": 24})})
    refused = r"rank 24 in model\.layers\.0\.o_proj, above max_lora_rank"
    with pytest.raises(ValueError, match=refused):
        load.add_adapter(req(1))
    assert ledger(mgr) == pool_pages_used(mgr) == dict.fromkeys(ledger(mgr), 0)


def test_full_slots_give_up_an_adapter_outside_the_running_batch():
    """vLLM's slot LRU, blind to the batch, paged out an adapter the step still needed, which
    was copied in again a moment later (26 of 56 batches through the worker)."""
    mgr = make_manager(pool_bytes=PAGE_BYTES * 40, max_loras=2)  # pages plenty, slots short
    for lora_id in (1, 2, 3):
        register(mgr, make_lora(lora_id, {"qkv_proj": 8}))
    mgr.in_step = True
    for lora_id in (2, 3):  # earlier steps: 2 is the least recently used
        mgr.activate_adapter(lora_id)
    mgr.protected = frozenset({1, 2})  # this step's batch, applied 1 first
    page_ins = mgr.stats.page_ins_total
    for lora_id in (1, 2):
        mgr.activate_adapter(lora_id)
    assert mgr.stats.page_ins_total - page_ins == 1  # 1 only; 2 stayed resident
    assert sorted(mgr.lora_index_to_id) == [1, 2]


def test_pinning_pages_an_adapter_in_when_the_pool_is_full():
    # vLLM pins by activating outside a step: a prefetch, skipped with the pool full, and the
    # pin then failed with "Cannot pin key".
    mgr = make_manager(pool_bytes=PAGE_BYTES * 8, max_loras=4)
    for lora_id in (1, 2, 3):
        register(mgr, make_lora(lora_id, {"qkv_proj": 16}))
    mgr.in_step = True
    for lora_id in (1, 2):  # fill the q/k/v group; both idle afterwards
        mgr.activate_adapter(lora_id)
    mgr.in_step = False
    assert mgr.pin_adapter(3)
    assert 3 in mgr._active_adapters and 3 in mgr._active_adapters.pinned_items
    assert not mgr.in_step
    assert ledger(mgr) == pool_pages_used(mgr)
