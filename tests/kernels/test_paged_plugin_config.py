"""Paged mode is opt-in through LORAPLEX_PAGED_*; off, the plugin changes nothing it did before."""

from __future__ import annotations

import importlib

import pytest

from kernels.paged_stats import WORKER_METHODS, PagedPoolStats, paged_layers, paged_pool_stats
from kernels.vllm_plugin import BadPluginSetting, paged_config_from_env


@pytest.mark.parametrize("environ", [{}, {"LORAPLEX_PAGED_LORA": "0"}, {"LORAPLEX_PAGED_LORA": ""}])
def test_off_by_default(environ):
    assert paged_config_from_env(environ) is None


def test_on_needs_a_budget_and_takes_a_page_size():
    with pytest.raises(BadPluginSetting, match="LORAPLEX_PAGED_POOL_BYTES is required"):
        paged_config_from_env({"LORAPLEX_PAGED_LORA": "1"})
    config = paged_config_from_env(
        {"LORAPLEX_PAGED_LORA": "true", "LORAPLEX_PAGED_POOL_BYTES": "1048576"}
    )
    assert config is not None and (config.pool_bytes, config.page_size) == (1048576, 4)
    config = paged_config_from_env(
        {
            "LORAPLEX_PAGED_LORA": "1",
            "LORAPLEX_PAGED_POOL_BYTES": "4096",
            "LORAPLEX_PAGED_PAGE_SIZE": "16",
        }
    )
    assert config is not None and config.page_size == 16
    assert config.admission and config.max_wait_s == 10.0  # admission is on unless switched off


def test_admission_settings():
    on = {"LORAPLEX_PAGED_LORA": "1", "LORAPLEX_PAGED_POOL_BYTES": "4096"}
    config = paged_config_from_env({**on, "LORAPLEX_PAGED_MAX_WAIT_MS": "500"})
    assert config is not None and config.max_wait_s == 0.5
    config = paged_config_from_env({**on, "LORAPLEX_PAGED_ADMISSION": "0"})
    assert config is not None and not config.admission
    with pytest.raises(BadPluginSetting, match="LORAPLEX_PAGED_ADMISSION must be 0 or 1"):
        paged_config_from_env({**on, "LORAPLEX_PAGED_ADMISSION": "sometimes"})


def test_policy_settings():
    on = {"LORAPLEX_PAGED_LORA": "1", "LORAPLEX_PAGED_POOL_BYTES": "4096"}
    config = paged_config_from_env(on)
    assert config is not None and (config.policy, config.max_skip_s) == ("rotate", 0.2)
    config = paged_config_from_env(
        {**on, "LORAPLEX_PAGED_POLICY": " Hold ", "LORAPLEX_PAGED_MAX_SKIP_MS": "50"}
    )
    assert config is not None and (config.policy, config.max_skip_s) == ("hold", 0.05)


def test_kernel_setting():
    on = {"LORAPLEX_PAGED_LORA": "1", "LORAPLEX_PAGED_POOL_BYTES": "4096"}
    config = paged_config_from_env(on)
    assert config is not None and config.kernel == "auto"
    config = paged_config_from_env({**on, "LORAPLEX_PAGED_KERNEL": " Triton"})
    assert config is not None and config.kernel == "triton"


def test_oversubscription_setting():
    on = {"LORAPLEX_PAGED_LORA": "1", "LORAPLEX_PAGED_POOL_BYTES": "4096"}
    config = paged_config_from_env(on)
    assert config is not None and config.max_oversubscription == 2.0
    config = paged_config_from_env({**on, "LORAPLEX_PAGED_MAX_OVERSUBSCRIPTION": "1.5"})
    assert config is not None and config.max_oversubscription == 1.5
    for bad in ("0.5", "nan", "inf", "lots"):
        with pytest.raises(BadPluginSetting, match="LORAPLEX_PAGED_MAX_OVERSUBSCRIPTION"):
            paged_config_from_env({**on, "LORAPLEX_PAGED_MAX_OVERSUBSCRIPTION": bad})


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"LORAPLEX_PAGED_LORA": "maybe"}, "must be 0 or 1"),
        ({"LORAPLEX_PAGED_LORA": "1", "LORAPLEX_PAGED_POOL_BYTES": "64MiB"}, "integer"),
        ({"LORAPLEX_PAGED_LORA": "1", "LORAPLEX_PAGED_POOL_BYTES": "0"}, "positive"),
        (
            {
                "LORAPLEX_PAGED_LORA": "1",
                "LORAPLEX_PAGED_POOL_BYTES": "8",
                "LORAPLEX_PAGED_PAGE_SIZE": "-4",
            },
            "positive",
        ),
        (
            {
                "LORAPLEX_PAGED_LORA": "1",
                "LORAPLEX_PAGED_POOL_BYTES": "8",
                "LORAPLEX_PAGED_POLICY": "lru",
            },
            "LORAPLEX_PAGED_POLICY must be one of hold, rotate",
        ),
        (
            {
                "LORAPLEX_PAGED_LORA": "1",
                "LORAPLEX_PAGED_POOL_BYTES": "8",
                "LORAPLEX_PAGED_KERNEL": "cuda",
            },
            "LORAPLEX_PAGED_KERNEL must be one of auto, torch, triton",
        ),
        (
            {
                "LORAPLEX_PAGED_LORA": "1",
                "LORAPLEX_PAGED_POOL_BYTES": "8",
                "LORAPLEX_PAGED_MAX_SKIP_MS": "0",
            },
            "positive",
        ),
        (
            {
                "LORAPLEX_PAGED_LORA": "1",
                "LORAPLEX_PAGED_POOL_BYTES": "8",
                "VLLM_LORA_ENABLE_DUAL_STREAM": "1",
            },
            "does not run with VLLM_LORA_ENABLE_DUAL_STREAM=1",
        ),
    ],
)
def test_bad_settings_are_refused_by_name(environ, message):
    with pytest.raises(BadPluginSetting, match=message):
        paged_config_from_env(environ)


def test_register_with_paged_mode_off_installs_no_paged_layer_and_the_slot_manager(
    monkeypatch,
):
    import vllm.lora.utils as lora_utils
    import vllm.v1.worker.lora_model_runner_mixin as runner_mixin
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    from kernels import cpu_lora_ops, vllm_plugin

    # Whatever register() rebinds is put back afterwards: other tests look at vLLM's own ops.
    for module in (lora_utils, runner_mixin):
        for name in ("_all_lora_classes", "LRUCacheWorkerLoRAManager"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, getattr(module, name))
    for module_name in cpu_lora_ops.NAMESPACES:
        module = importlib.import_module(module_name)
        for name in cpu_lora_ops.REPLACEMENTS:
            monkeypatch.setattr(module, name, getattr(module, name))
    for name in WORKER_METHODS:
        monkeypatch.setattr(WorkerWrapperBase, name, None, raising=False)
    monkeypatch.delenv("LORAPLEX_PAGED_LORA", raising=False)
    vllm_plugin.register()
    assert not any(c.__name__.startswith("Paged") for c in lora_utils._all_lora_classes)
    # Slot mode's own manager: vLLM's, without the vocab LoRA wrappers (kernels.slot_vocab).
    from kernels.slot_vocab import SlotLRUCacheWorkerLoRAManager

    assert runner_mixin.LRUCacheWorkerLoRAManager is SlotLRUCacheWorkerLoRAManager
    assert issubclass(SlotLRUCacheWorkerLoRAManager, LRUCacheWorkerLoRAManager)
    # The read-only stats RPC is always there, answering None without paged mode.
    for name in WORKER_METHODS:
        assert callable(getattr(WorkerWrapperBase, name))


def test_stats_rpc_reads_the_workers_adapter_manager():
    class Obj:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    stats = PagedPoolStats(page_size=4, pages_total=10, pages_used=3)
    stats.group_pages = {"qkv_proj": {"total": 10, "used": 3}}
    layer = Obj(paged_geometry=object())
    manager = Obj(stats=stats, modules={"a.qkv_proj": layer, "lm_head": Obj()})
    worker = Obj(model_runner=Obj(lora_manager=Obj(_adapter_manager=manager)))
    snapshot = paged_pool_stats(worker)
    assert snapshot is not None and snapshot["pages_free"] == 7 and snapshot["pages_used"] == 3
    assert paged_layers(worker) == {"a.qkv_proj": "Obj"}
    assert paged_pool_stats(Obj(model_runner=None)) is None
    groups = snapshot.pop("group_pages")
    assert groups == {"qkv_proj": {"total": 10, "used": 3}}
    assert all(type(v) is int for v in snapshot.values())  # plain, picklable values
