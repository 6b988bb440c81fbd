"""Slot mode (vLLM's own per-slot LoRA buffers) without vLLM's embedding and lm_head LoRA
wrappers, as paged mode (kernels.paged_vocab): the base layers serve the vocabulary, which is
exact for every adapter loraplex serves (its registry refuses embedding and lm_head deltas; one
that reaches the engine anyway is refused when it is added, so never served without them). It
saves `2 x max_loras x vocab x max_lora_rank` buffers and two LoRA ops a step, and it is what
makes prompt logprobs (gateway/prompt_drift.py) work in a batch: vLLM 0.32's lm_head wrapper
indexes prompt positions with one adapter index per request, which fails the step once two
requests share it."""

from __future__ import annotations

from typing import Any

from vllm.lora.model_manager import LRUCacheLoRAModelManager
from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

from kernels.paged_vocab import refuse_vocab_weights, unwrap_vocab_layers


class SlotLRUCacheLoRAModelManager(LRUCacheLoRAModelManager):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.unwrapped_vocab_layers = unwrap_vocab_layers(self.model, self.modules)

    def add_adapter(self, lora: Any) -> bool:
        refuse_vocab_weights(self, lora.id, lora, self.unwrapped_vocab_layers)
        return super().add_adapter(lora)


class SlotLRUCacheWorkerLoRAManager(LRUCacheWorkerLoRAManager):
    _manager_cls = SlotLRUCacheLoRAModelManager

    def _load_adapter(self, lora_request: Any) -> Any:
        # Refused as soon as it is read: vLLM evicts the oldest adapter (and, in place, the
        # adapter's previous weights) between loading and adding it.
        lora = super()._load_adapter(lora_request)
        manager = self._adapter_manager
        if isinstance(manager, SlotLRUCacheLoRAModelManager):
            refuse_vocab_weights(manager, lora.id, lora, manager.unwrapped_vocab_layers)
        return lora


def install() -> list[str]:
    """Rebind vLLM's worker LoRA manager to the slot one; returns what was rebound."""
    import vllm.v1.worker.lora_model_runner_mixin as runner_mixin

    if not hasattr(runner_mixin, "LRUCacheWorkerLoRAManager"):
        raise RuntimeError("loraplex: vLLM LoRA layout changed (no LRUCacheWorkerLoRAManager)")
    runner_mixin.LRUCacheWorkerLoRAManager = SlotLRUCacheWorkerLoRAManager  # type: ignore[misc]
    return ["lora_model_runner_mixin.LRUCacheWorkerLoRAManager"]
