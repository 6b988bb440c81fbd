"""Import shim: just enough of vLLM 0.32 for its LoRA Triton ops (see ../README.md)."""

__version__ = "0.32.0+loraplex-ops-shim"
