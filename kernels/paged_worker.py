"""How paged mode enters vLLM's worker: the worker LoRA manager that tells the pool which
adapters a step needs, and `install`, which rebinds vLLM's layer classes and worker manager to
the paged ones (kernels.paged_lora_manager holds the manager they drive)."""

from __future__ import annotations

from typing import Any

from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

from kernels import paged_lora_manager
from kernels.paged_config import PagedLoraConfig
from kernels.paged_lora_manager import PagedLRUCacheLoRAModelManager


class PagedLRUCacheWorkerLoRAManager(LRUCacheWorkerLoRAManager):
    """vLLM's worker LoRA manager that tells the pool which adapters the step needs."""

    _manager_cls = PagedLRUCacheLoRAModelManager

    def _apply_adapters(self, lora_requests: set[Any]) -> None:
        manager = self._adapter_manager
        assert isinstance(manager, PagedLRUCacheLoRAModelManager)
        manager.protected = frozenset(r.lora_int_id for r in lora_requests if r)
        manager.in_step = True
        try:
            super()._apply_adapters(lora_requests)
        finally:
            manager.protected = frozenset()
            manager.in_step = False
            # The step's forward (or graph replay) follows on the compute stream: it must
            # see every page copied so far, this step's and prefetches' alike.
            manager.copier.wait_ready()


def install(config: PagedLoraConfig) -> list[str]:
    """Swap in the paged layer classes and managers; returns what was rebound."""
    import vllm.lora.utils as lora_utils
    import vllm.v1.worker.lora_model_runner_mixin as runner_mixin

    from kernels.paged_lora_layers import PAGED_LAYER_CLASSES

    paged_lora_manager._config = config
    classes = lora_utils._all_lora_classes
    missing = [c.__name__ for c in PAGED_LAYER_CLASSES if c not in classes]
    if missing or not hasattr(runner_mixin, "LRUCacheWorkerLoRAManager"):
        raise RuntimeError(f"loraplex: vLLM LoRA layout changed (missing {missing})")
    # from_layer() walks this tuple in order; replacing in place keeps vLLM's precedence.
    lora_utils._all_lora_classes = tuple(PAGED_LAYER_CLASSES.get(c, c) for c in classes)
    runner_mixin.LRUCacheWorkerLoRAManager = PagedLRUCacheWorkerLoRAManager  # type: ignore[misc]
    return [
        "vllm.lora.utils._all_lora_classes",
        "lora_model_runner_mixin.LRUCacheWorkerLoRAManager",
    ]
