"""Ground truth for adapted outputs: HF transformers with the adapter merged into the weights.

W' = W + scale·B·A with scale = alpha/r (alpha/√r for rsLoRA), done by peft's merge_and_unload,
then plain greedy decoding. Independent of vLLM's LoRA kernels, slots and batching.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any


@lru_cache(maxsize=8)
def merged_model(base: Path, adapter: Path | None) -> Any:
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


def greedy_tokens(
    base: Path, adapter: Path | None, prompt_ids: list[int], max_new_tokens: int
) -> list[int]:
    import torch

    model = merged_model(base, adapter)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    tokens: list[int] = out[0, len(prompt_ids) :].tolist()
    return tokens
