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


@lru_cache(maxsize=2)
def merged_stack_model(base: Path, components: tuple[tuple[Path, float], ...]) -> Any:
    """The base with each (adapter, weight) merged in turn, its lora_B multiplied by the
    weight first: W' = W + Σ weight·scale·B·A, by peft's own scaling of each adapter."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    for adapter, weight in components:
        model = PeftModel.from_pretrained(model, adapter)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_B." in name:
                    param.mul_(weight)
        model = model.merge_and_unload()
    return model.eval()


def greedy_tokens(
    base: Path, adapter: Path | None, prompt_ids: list[int], max_new_tokens: int
) -> list[int]:
    return greedy_tokens_of(merged_model(base, adapter), prompt_ids, max_new_tokens)


def greedy_tokens_of(model: Any, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    tokens: list[int] = out[0, len(prompt_ids) :].tolist()
    return tokens


def constrained_greedy_tokens(
    base: Path, adapter: Path | None, prompt_ids: list[int], regex: str, max_new_tokens: int
) -> list[int]:
    """Greedy decoding where, at every step, only tokens that keep the text within `regex`
    (or end it, once it matches) may win: xgrammar's matcher over one sequence, no batching,
    so it is what vLLM's structured outputs must give each request of a mixed batch."""
    import torch
    import xgrammar as xgr
    from transformers import AutoTokenizer

    model = merged_model(base, adapter)
    tokenizer = AutoTokenizer.from_pretrained(base)
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=model.config.vocab_size)
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_regex(regex))
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    ids = list(prompt_ids)
    tokens: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids])).logits[:, -1, :].float()
            matcher.fill_next_token_bitmask(bitmask)
            xgr.apply_token_bitmask_inplace(logits, bitmask)
            token = int(logits.argmax(dim=-1))
            if not matcher.accept_token(token):
                raise AssertionError(f"the matcher refused its own argmax {token}")
            if matcher.is_terminated():  # the stop token: vLLM ends the request here
                break
            tokens.append(token)
            ids.append(token)
    return tokens
