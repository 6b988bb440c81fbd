"""vLLM 0.32's lora_shrink, lora_expand and LoRAKernelMeta (the fp8 and MoE ops are left out)."""

from vllm.lora.ops.triton_ops.lora_expand_op import lora_expand
from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta
from vllm.lora.ops.triton_ops.lora_shrink_op import lora_shrink

__all__ = ["LoRAKernelMeta", "lora_expand", "lora_shrink"]
