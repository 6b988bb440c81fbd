"""loraplex's vLLM general plugin (entry point group `vllm.general_plugins`).

vLLM calls `register()` in every process it starts (API process, engine core, workers), so
whatever loraplex changes inside the engine is installed here. It reaches into vLLM internals
whose layout changes between minor releases, hence the hard version check: on any vLLM other
than 0.32.x it refuses to start rather than patch the wrong thing.

To run vLLM without it (e.g. the vanilla baseline in benchmarks), set `VLLM_PLUGINS=""`.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

SUPPORTED_VLLM_SERIES = "0.32."


class UnsupportedVLLMVersion(RuntimeError):
    """Raised at engine start when the installed vLLM is not the series loraplex patches."""


def check_vllm_version(version: str) -> None:
    if not version.startswith(SUPPORTED_VLLM_SERIES):
        raise UnsupportedVLLMVersion(
            f"loraplex's vLLM plugin supports vLLM {SUPPORTED_VLLM_SERIES}x only, found {version}; "
            "install loraplex's pinned extra (cpu or gpu) or unset the plugin with VLLM_PLUGINS=''"
        )


def register() -> None:
    """Entry point: verify the vLLM version, then install loraplex's engine-side changes."""
    import vllm

    from kernels import cpu_lora_ops

    check_vllm_version(vllm.__version__)
    patched = cpu_lora_ops.install()
    logger.debug("loraplex plugin: masked no-adapter rows in %s", ", ".join(patched))
