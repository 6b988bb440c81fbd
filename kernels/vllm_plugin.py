"""loraplex's vLLM general plugin (entry point group `vllm.general_plugins`).

vLLM calls `register()` in every process it starts (API process, engine core, workers), so
whatever loraplex changes inside the engine is installed here. It reaches into vLLM internals
whose layout changes between minor releases, hence the hard version check: on any vLLM other
than 0.32.x it refuses to start rather than patch the wrong thing.

Always installed: kernels.cpu_lora_ops (rows without an adapter get zero LoRA delta),
kernels.engine_core_loads (a request's adapter is loaded when the request reaches the engine
core, and a failed load refuses that request rather than killing an engine step), and
kernels.engine_process (a status RPC the gateway checks; children exit with their parent).
In slot mode (paged mode off), kernels.slot_scheduler: a request that waited longer than
LORAPLEX_PAGED_MAX_WAIT_MS for an adapter slot holds back requests for other adapters, so one
tenant's steady traffic on max_loras adapters cannot keep every other adapter waiting.

Opt-in, read from the environment when `register()` runs (vLLM's child processes inherit it):
    LORAPLEX_PAGED_LORA=1             adapter weights in a paged pool bounded by bytes, not by
                                      max_loras x max_lora_rank (kernels/README.md)
    LORAPLEX_PAGED_POOL_BYTES=N       the pool's size in bytes, all paged layers together
                                      (required with paged mode)
    LORAPLEX_PAGED_PAGE_SIZE=4        rank rows per page (default 4)
    LORAPLEX_PAGED_MAX_WAIT_MS=10000  admission: a request waiting longer goes first, and no
                                      new adapter is admitted ahead of it (default 10000);
                                      read in slot mode too (kernels.slot_admission)
    LORAPLEX_PAGED_POLICY=rotate      rotate (default): running requests may sit out steps so
                                      that the pages are shared between steps; hold: a new
                                      adapter waits for a running one's pages (kernels/README.md)
    LORAPLEX_PAGED_MAX_SKIP_MS=200    rotate: a running request sits out at most this long
    LORAPLEX_PAGED_MAX_OVERSUBSCRIPTION=2
                                      rotate: a new adapter starts only while the running
                                      adapters' pages stay within this x the pool (>= 1)
    LORAPLEX_PAGED_KERNEL=auto        auto: the SGMV Triton kernels on CUDA, the torch path on
                                      CPU; triton on CPU runs them under TRITON_INTERPRET=1
                                      (tests only: slow); torch is CPU only
    LORAPLEX_PAGED_ADMISSION=1        residency-aware admission in the scheduler (default on;
                                      0 only to test the worker's own refusal)
    LORAPLEX_PAGED_DEMAND=[...]       the registered adapters as a JSON list of
                                      [rank, [target modules], count]: the pool's bytes are
                                      split between layer groups by what they would take
                                      (kernels.page_groups); unset or [] = equal pages

The gateway sets them from its Settings (paged_lora, paged_pool_bytes, ...) with
`paged_environment` before it starts the engine.

To run vLLM without any of it (e.g. the vanilla baseline in benchmarks), set `VLLM_PLUGINS=""`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from kernels.page_groups import DemandEntry, format_demand, parse_demand

if TYPE_CHECKING:
    from kernels.paged_config import PagedLoraConfig

logger = logging.getLogger(__name__)

SUPPORTED_VLLM_SERIES = "0.32."
PAGED_ENV = "LORAPLEX_PAGED_LORA"
DUAL_STREAM_ENV = "VLLM_LORA_ENABLE_DUAL_STREAM"  # vLLM's own
POOL_BYTES_ENV = "LORAPLEX_PAGED_POOL_BYTES"
PAGE_SIZE_ENV = "LORAPLEX_PAGED_PAGE_SIZE"
MAX_WAIT_ENV = "LORAPLEX_PAGED_MAX_WAIT_MS"
ADMISSION_ENV = "LORAPLEX_PAGED_ADMISSION"
POLICY_ENV = "LORAPLEX_PAGED_POLICY"
MAX_SKIP_ENV = "LORAPLEX_PAGED_MAX_SKIP_MS"
KERNEL_ENV = "LORAPLEX_PAGED_KERNEL"
OVERSUBSCRIPTION_ENV = "LORAPLEX_PAGED_MAX_OVERSUBSCRIPTION"
DEMAND_ENV = "LORAPLEX_PAGED_DEMAND"
DEFAULT_MAX_OVERSUBSCRIPTION = 2.0
KERNELS = ("auto", "torch", "triton")
DEFAULT_KERNEL: Literal["auto", "torch", "triton"] = "auto"
POLICIES = ("hold", "rotate")
# rotate: measured 2.0-3.0x vLLM's req/s at TTFT p95 0.11-0.16x (benchmarks/results/residency
# runs 14-15) where hold reached 1.3-1.6x; hold stays for callers who prefer steady TPOT.
DEFAULT_POLICY: Literal["hold", "rotate"] = "rotate"
DEFAULT_MAX_SKIP_MS = 200
DEFAULT_PAGE_SIZE = 4
# Bounded waiting (kernels.paged_admission): 2 s caused head-of-line convoys at 1000 adapters
# under open-loop load (TTFT p50 1.3 s vs 0.14 s without aging, benchmarks/results/residency).
DEFAULT_MAX_WAIT_MS = 10_000
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


class UnsupportedVLLMVersion(RuntimeError):
    """Raised at engine start when the installed vLLM is not the series loraplex patches."""


class BadPluginSetting(ValueError):
    """A LORAPLEX_PAGED_* variable that cannot be used as given."""


def check_vllm_version(version: str) -> None:
    if not version.startswith(SUPPORTED_VLLM_SERIES):
        raise UnsupportedVLLMVersion(
            f"loraplex's vLLM plugin supports vLLM {SUPPORTED_VLLM_SERIES}x only, found {version}; "
            "install loraplex's pinned extra (cpu or gpu) or unset the plugin with VLLM_PLUGINS=''"
        )


def _positive_int(environ: Mapping[str, str], name: str, default: int | None) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        if default is None:
            raise BadPluginSetting(f"{name} is required when {PAGED_ENV} is on")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadPluginSetting(f"{name} must be an integer, got {raw!r}") from None
    if value <= 0:
        raise BadPluginSetting(f"{name} must be positive, got {value}")
    return value


def paged_config_from_env(environ: Mapping[str, str]) -> PagedLoraConfig | None:
    """Paged mode's settings, or None when it is off (the default)."""
    from kernels.paged_config import PagedLoraConfig

    if not _flag(environ, PAGED_ENV, default=False):
        return None
    if _flag(environ, DUAL_STREAM_ENV, default=False):
        # vLLM's dual-stream LoRA path calls its punica ops on the layers' stacked buffers
        # directly, never the paged layers' delta: every adapter would silently be the base.
        raise BadPluginSetting(f"{PAGED_ENV} does not run with {DUAL_STREAM_ENV}=1; unset it")
    return PagedLoraConfig(
        pool_bytes=_positive_int(environ, POOL_BYTES_ENV, None),
        page_size=_positive_int(environ, PAGE_SIZE_ENV, DEFAULT_PAGE_SIZE),
        admission=_flag(environ, ADMISSION_ENV, default=True),
        max_wait_s=_positive_int(environ, MAX_WAIT_ENV, DEFAULT_MAX_WAIT_MS) / 1000,
        policy=_policy(environ),
        max_skip_s=_positive_int(environ, MAX_SKIP_ENV, DEFAULT_MAX_SKIP_MS) / 1000,
        kernel=_choice(environ, KERNEL_ENV, KERNELS, DEFAULT_KERNEL),
        max_oversubscription=_oversubscription(environ),
        demand=_demand(environ),
    )


def _demand(environ: Mapping[str, str]) -> tuple[DemandEntry, ...]:
    raw = environ.get(DEMAND_ENV, "").strip()
    if not raw:
        return ()
    try:
        return tuple(parse_demand(raw))
    except ValueError as exc:
        raise BadPluginSetting(f"{DEMAND_ENV}: {exc}") from None


def _oversubscription(environ: Mapping[str, str]) -> float:
    raw = environ.get(OVERSUBSCRIPTION_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_OVERSUBSCRIPTION
    try:
        value = float(raw)
    except ValueError:
        raise BadPluginSetting(f"{OVERSUBSCRIPTION_ENV} must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value < 1:
        raise BadPluginSetting(f"{OVERSUBSCRIPTION_ENV} must be a finite number >= 1, got {raw}")
    return value


def _policy(environ: Mapping[str, str]) -> str:
    return _choice(environ, POLICY_ENV, POLICIES, DEFAULT_POLICY)


def _choice(environ: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    value = environ.get(name, "").strip().lower() or default
    if value not in choices:
        raise BadPluginSetting(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def paged_environment(
    *,
    enabled: bool,
    pool_bytes: int | None,
    page_size: int,
    max_wait_ms: int,
    policy: str = DEFAULT_POLICY,
    max_skip_ms: int = DEFAULT_MAX_SKIP_MS,
    kernel: str = DEFAULT_KERNEL,
    max_oversubscription: float = DEFAULT_MAX_OVERSUBSCRIPTION,
    demand: tuple[DemandEntry, ...] = (),
) -> dict[str, str]:
    """The LORAPLEX_PAGED_* variables for these settings (what `paged_config_from_env` reads
    back), to export before vLLM starts its processes. Admission is left alone: switching it
    off exists only for tests of the worker's own refusal."""
    if not enabled:
        return {PAGED_ENV: "0", MAX_WAIT_ENV: str(max_wait_ms)}  # slot mode's bounded wait
    if pool_bytes is None or pool_bytes <= 0:
        raise BadPluginSetting(f"{POOL_BYTES_ENV} is required when {PAGED_ENV} is on")
    return {
        PAGED_ENV: "1",
        POOL_BYTES_ENV: str(pool_bytes),
        PAGE_SIZE_ENV: str(page_size),
        MAX_WAIT_ENV: str(max_wait_ms),
        POLICY_ENV: policy,
        MAX_SKIP_ENV: str(max_skip_ms),
        KERNEL_ENV: kernel,
        OVERSUBSCRIPTION_ENV: repr(float(max_oversubscription)),
        DEMAND_ENV: format_demand(demand),
    }


def _flag(environ: Mapping[str, str], name: str, *, default: bool) -> bool:
    raw = environ.get(name)
    if raw is None:
        return default
    flag = raw.strip().lower()
    if flag in _FALSE:
        return False
    if flag not in _TRUE:
        raise BadPluginSetting(f"{name} must be 0 or 1, got {flag!r}")
    return True


def install_worker_methods() -> None:
    """Add loraplex's read-only RPC methods (kernels.paged_stats.WORKER_METHODS) to vLLM's
    worker wrapper: `collective_rpc("loraplex_paged_pool_stats")` then works without vLLM's
    insecure (pickled callable) serialization. Pure additions: nothing vLLM calls changes."""
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    from kernels.engine_process import plugin_status
    from kernels.paged_stats import WORKER_METHODS

    for name, method in {**WORKER_METHODS, "loraplex_plugin_status": plugin_status}.items():
        setattr(WorkerWrapperBase, name, method)


def register() -> None:
    """Entry point: verify the vLLM version, then install loraplex's engine-side changes."""
    import vllm

    from kernels import cpu_lora_ops, engine_core_loads
    from kernels.engine_process import exit_with_parent

    check_vllm_version(vllm.__version__)
    exit_with_parent()
    patched = cpu_lora_ops.install()
    logger.debug("loraplex plugin: masked no-adapter rows in %s", ", ".join(patched))
    patched = engine_core_loads.install()
    logger.debug("loraplex plugin: adapters load on arrival in %s", ", ".join(patched))
    install_worker_methods()
    config = paged_config_from_env(os.environ)
    if config is None:
        from kernels import slot_scheduler

        max_wait_s = _positive_int(os.environ, MAX_WAIT_ENV, DEFAULT_MAX_WAIT_MS) / 1000
        rebound = slot_scheduler.install(max_wait_s)
        from kernels import slot_vocab

        rebound += slot_vocab.install()
        logger.debug("loraplex plugin: slot mode, rebound %s", ", ".join(rebound))
    else:
        from kernels import paged_worker

        rebound = paged_worker.install(config)
        if config.admission:
            from kernels import paged_scheduler

            rebound += paged_scheduler.install(
                config.max_wait_s,
                policy=config.policy,
                max_skip_s=config.max_skip_s,
                max_oversubscription=config.max_oversubscription,
            )
        logger.info(
            "loraplex plugin: paged LoRA on (%d bytes, pages of %d rank rows, policy %s); "
            "rebound %s",
            config.pool_bytes,
            config.page_size,
            config.policy,
            ", ".join(rebound),
        )
