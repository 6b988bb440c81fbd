"""vLLM's embedding and lm_head LoRA wrappers, taken out in paged mode (see
kernels.paged_lora_manager): they hold `max_loras x vocab x max_lora_rank` buffers each and run
two LoRA ops per step for deltas loraplex never serves."""

from __future__ import annotations

from typing import Any

from torch import nn
from vllm.lora.layers import LogitsProcessorWithLoRA, VocabParallelEmbeddingWithLoRA
from vllm.lora.utils import replace_submodule


def unwrap_vocab_layers(model: nn.Module, modules: dict[str, Any]) -> tuple[str, ...]:
    """Mount each vocab wrapper's base layer in its place in `model`, drop the wrappers from
    `modules` (vLLM's LoRA modules by name); the names taken out, sorted."""
    wrappers = {
        name: module
        for name, module in modules.items()
        if type(module) in (VocabParallelEmbeddingWithLoRA, LogitsProcessorWithLoRA)
    }
    if not wrappers:
        return ()
    by_object = {id(module): module for module in wrappers.values()}
    mounted = [
        (path, by_object[id(m)])
        for path, m in model.named_modules(remove_duplicate=False)
        if id(m) in by_object
    ]
    for path, wrapper in mounted:
        replace_submodule(model, path, wrapper.base_layer)
    for name in wrappers:
        del modules[name]
    return tuple(sorted(wrappers))
