"""loraplex kernels: math and memory for serving many LoRA adapters in one batch.

Import the submodules (`kernels.sgmv_shrink`, `kernels.sgmv_expand`, `kernels.sgmv_metadata`,
`kernels.paged_pool`, `kernels.cpu_lora_ops`, `kernels.vllm_plugin`); this package imports
nothing itself, so probing it (transformers looks for an unrelated PyPI package also named
`kernels`) costs nothing and pulls in neither torch nor triton.
"""
