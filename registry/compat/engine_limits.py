"""What the serving engine was started with, as the gate sees it (no torch, no vLLM import)."""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_DTYPES = frozenset({"F16", "BF16", "F32"})
_TORCH_DTYPE_NAMES = {"float16": "F16", "half": "F16", "bfloat16": "BF16", "float32": "F32"}


@dataclass(frozen=True)
class EngineLimits:
    """What the serving engine was started with (vLLM's --max-lora-rank and its LoRA dtypes).

    `dtype` is the dtype the engine holds LoRA weights in (vLLM's resolved lora_dtype, as a
    safetensors name); None while it is not known, and then values are not judged against it."""

    max_lora_rank: int
    supported_dtypes: frozenset[str] = SUPPORTED_DTYPES
    dtype: str | None = None


def safetensors_dtype(torch_name: str | None) -> str | None:
    """ "float16" or "torch.float16" → "F16"; None for "auto", None or a dtype not served."""
    if torch_name is None:
        return None
    return _TORCH_DTYPE_NAMES.get(torch_name.removeprefix("torch."))
