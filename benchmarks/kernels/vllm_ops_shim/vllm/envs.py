"""vLLM 0.32's environment settings the LoRA Triton ops read, with vLLM's own defaults."""

import os

VLLM_BATCH_INVARIANT = bool(int(os.getenv("VLLM_BATCH_INVARIANT", "0")))
VLLM_LORA_DISABLE_PDL = bool(int(os.getenv("VLLM_LORA_DISABLE_PDL", "0")))
VLLM_LORA_ENABLE_DUAL_STREAM = bool(int(os.getenv("VLLM_LORA_ENABLE_DUAL_STREAM", "0")))
VLLM_TUNED_CONFIG_FOLDER = os.getenv("VLLM_TUNED_CONFIG_FOLDER", None)
