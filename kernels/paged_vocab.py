"""vLLM's embedding and lm_head LoRA wrappers, taken out in both modes (kernels.paged_lora_manager,
kernels.slot_vocab): they hold `max_loras x vocab x max_lora_rank` buffers each and run two LoRA
ops per step for deltas loraplex never serves (the registry refuses them); and vLLM 0.32's
lm_head wrapper maps one adapter per request onto every prompt position when prompt logprobs are
asked for, which fails the step as soon as two requests share it."""

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


def refuse_vocab_weights(manager: Any, lora_id: int, lora: Any, unwrapped: tuple[str, ...]) -> None:
    """Raise when `lora` carries weights for a vocab layer taken out: served without them, it
    would be another adapter than the one asked for."""
    carried = [
        name for name in unwrapped if manager._get_lora_layer_weights(lora, name) is not None
    ]
    if carried:
        raise ValueError(
            f"adapter {lora_id} has LoRA weights for {', '.join(carried)}: loraplex serves "
            "linear projections only (its registry refuses such adapters)"
        )
