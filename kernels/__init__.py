"""loraplex kernels: math and memory for serving many LoRA adapters in one batch.

Import the submodules (`kernels.sgmv_shrink`, `kernels.sgmv_expand`, `kernels.sgmv_metadata`,
`kernels.paged_pool`, `kernels.paged_lora_cpu`, `kernels.paged_residency`, `kernels.paged_stats`,
`kernels.paged_lora_layers`, `kernels.paged_lora_manager`, `kernels.cpu_lora_ops`,
`kernels.vllm_plugin`; kernels/README.md has the map); this package imports
nothing itself, so probing it (transformers looks for an unrelated PyPI package also named
`kernels`) costs nothing and pulls in neither torch nor triton.
"""
