"""EngineClient over vLLM's AsyncLLM running inside the gateway process (engine core in a child)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, TypeVar

from gateway.engine.client import (
    AdapterHandle,
    EngineDead,
    EngineError,
    EngineHealth,
    EngineRejected,
    EngineStalled,
    GenerationUpdate,
    SamplingOptions,
)
from gateway.engine.daemon_thread import run_in_daemon_thread
from gateway.engine.processes import descendants, stop_descendants
from gateway.engine.vllm_convert import (
    REJECTED_ERRORS,
    STRUCTURED_CHECKS,
    generation_update,
    lora_request,
    raised_in,
    sampling_params,
)
from gateway.engine.vllm_utility import engine_core_has, raised, send_utility
from gateway.settings import Settings
from kernels.engine_core_loads import STATUS_UTILITY as LOADS_ON_ARRIVAL
from kernels.page_groups import DemandEntry
from kernels.vllm_plugin import paged_environment

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)

# Share of host memory vLLM's CPU backend reserves when the user did not choose one.
CPU_MEMORY_UTILIZATION = 0.2
CUDA_MEMORY_UTILIZATION = 0.9
HEALTH_PROBE_TIMEOUT_S = 3.0
# Loading an adapter reads it from disk into the engine's host memory: seconds for large ones.
ADAPTER_CALL_TIMEOUT_S = 120.0
DEATH_POLL_S = 0.5  # how soon a utility call pending on a dead engine fails
T = TypeVar("T")


def paged_environment_for(
    settings: Settings, demand: tuple[DemandEntry, ...] = ()
) -> dict[str, str]:
    return paged_environment(
        enabled=settings.paged_lora,
        pool_bytes=settings.paged_pool_bytes,
        page_size=settings.paged_page_size,
        max_wait_ms=settings.paged_max_wait_ms,
        policy=settings.paged_policy,
        max_skip_ms=settings.paged_max_skip_ms,
        kernel=settings.paged_kernel,
        max_oversubscription=settings.paged_max_oversubscription,
        demand=demand if settings.paged_split == "demand" else (),
    )


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


class EmbeddedVLLM:
    """One vLLM AsyncLLM; `start()` blocks until the engine serves (15-20 s on 2 CPU cores)."""

    def __init__(self, settings: Settings, model_path: str, served_model_name: str):
        self._settings = settings
        self._model_path = model_path
        self._served_model_name = served_model_name
        self._engine: AsyncLLM | None = None
        self.max_model_len = settings.max_model_len
        self.lora_dtype: str | None = None
        self.loads_adapters_on_arrival = False  # learned from the engine core in start()
        # The registered adapters (rank, modules, count), set before start(): paged mode
        # splits its pool between layer groups by them (kernels.page_groups).
        self.paged_demand: tuple[DemandEntry, ...] = ()
        self._unloads: set[asyncio.Task[Any]] = set()

    def _engine_args(self) -> Any:
        from vllm import AsyncEngineArgs
        from vllm.config import StructuredOutputsConfig

        s = self._settings
        utilization = s.gpu_memory_utilization or (
            CUDA_MEMORY_UTILIZATION if _cuda_available() else CPU_MEMORY_UTILIZATION
        )
        return AsyncEngineArgs(
            model=self._model_path,
            served_model_name=[self._served_model_name],
            enable_lora=True,
            max_loras=s.max_loras,
            max_lora_rank=s.max_lora_rank,  # type: ignore[arg-type]  # validated in Settings
            max_cpu_loras=max(s.max_cpu_loras, s.max_loras),
            max_model_len=s.max_model_len,
            max_num_seqs=s.max_num_seqs,
            dtype=s.dtype,
            gpu_memory_utilization=utilization,
            enforce_eager=s.enforce_eager,
            structured_outputs_config=StructuredOutputsConfig(
                backend=s.structured_outputs_backend,
                disable_any_whitespace=s.structured_outputs_compact_json,
                # The engine's grammar then starts where a chat output's reasoning ends.
                reasoning_parser=s.reasoning_parser or "",
            ),
            seed=s.seed,
        )

    async def start(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        args = self._engine_args()
        # The plugin (kernels.vllm_plugin) reads paged mode from the environment in every
        # process vLLM starts; they inherit ours, so these settings decide, not stray variables.
        os.environ.update(paged_environment_for(self._settings, self.paged_demand))
        # Engine construction blocks for seconds (process spawn, weight load, warm-up), in a
        # thread that neither a timeout nor a signal (gateway.shutdown.StartupGuard) can stop:
        # an engine it finishes after the caller gave up is shut down there instead of left
        # running with nobody holding it. The thread is a daemon: a process that gave up on
        # the start exits without waiting for it (vLLM's processes then follow their parent).
        lock, built, abandoned = threading.Lock(), [], threading.Event()
        present = descendants()  # processes the engine's start did not make

        def build() -> AsyncLLM:
            engine = AsyncLLM.from_engine_args(args)
            with lock:
                if abandoned.is_set():
                    logger.warning("the engine started after the gateway gave up: stopping it")
                    engine.shutdown()
                built.append(engine)
            return engine

        try:
            self._engine = await asyncio.wait_for(
                run_in_daemon_thread(build, name="loraplex-engine-start"),
                timeout=self._settings.engine_start_timeout_s,
            )
        except (TimeoutError, asyncio.CancelledError):
            with lock:
                abandoned.set()
                for engine in built:  # finished in the meantime
                    engine.shutdown()
                if not built:  # still being built: its processes would outlive this one
                    stop_descendants(spare=present)
            raise
        await self._check_plugin()
        # kernels.engine_core_loads, in the engine core unless vLLM was told to skip the plugin:
        # only then may a request go with its adapter's load in flight.
        self.loads_adapters_on_arrival = await engine_core_has(
            self.engine, LOADS_ON_ARRIVAL, HEALTH_PROBE_TIMEOUT_S * 10
        )
        self.max_model_len = self._engine.model_config.max_model_len
        lora_config = self._engine.vllm_config.lora_config
        if lora_config is not None:  # vLLM resolved "auto" to the model's dtype at start
            self.lora_dtype = str(lora_config.lora_dtype).removeprefix("torch.")

    async def _check_plugin(self) -> None:
        """On CPU, refuse to serve unless every worker runs loraplex's plugin: vLLM loads it
        through an entry point it skips silently (a VLLM_PLUGINS without `loraplex`) or only
        logs when it fails, and without its masked ops base-model rows of a batch with every
        LoRA slot full get the last slot's adapter, another tenant's."""
        if _cuda_available():
            return  # vLLM's GPU ops skip rows without an adapter themselves
        engine = self.engine
        try:
            async with asyncio.timeout(HEALTH_PROBE_TIMEOUT_S * 10):
                statuses = await engine.collective_rpc("loraplex_plugin_status")
        except Exception as exc:
            engine.shutdown()
            self._engine = None
            raise RuntimeError(
                "loraplex's vLLM plugin did not answer in the engine's workers (is it excluded "
                f"by VLLM_PLUGINS, or did it fail to load?): {exc}"
            ) from exc
        if not statuses or not all(s.get("cpu_ops_masked") for s in statuses):
            engine.shutdown()
            self._engine = None
            raise RuntimeError(
                f"loraplex's tenant-safe CPU LoRA ops are not installed in every worker: {statuses}"
            )

    async def stop(self) -> None:
        if self._engine is not None:
            engine, self._engine = self._engine, None
            engine.shutdown()

    @property
    def engine(self) -> AsyncLLM:
        if self._engine is None:
            raise EngineDead("engine not started")
        return self._engine

    def default_sampling(self) -> dict[str, Any]:
        return dict(self.engine.model_config.get_diff_sampling_param())

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        adapter: AdapterHandle | None,
    ) -> AsyncGenerator[GenerationUpdate]:
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        engine = self.engine
        if engine.errored:
            raise EngineDead("the inference engine is not running")
        produced = False
        try:
            params = sampling_params(options)
            prompt: dict[str, Any] = {"prompt_token_ids": prompt_token_ids}
            if options.cache_salt is not None:
                prompt["cache_salt"] = options.cache_salt
            extra: dict[str, Any] = {}
            if self._settings.reasoning_parser and options.constraint is not None:
                # Told always: left to judge by the prompt, the engine held a completion's
                # constraint back until a </think> that never came.
                extra["reasoning_ended"] = options.reasoning_ended is not False
                if options.reasoning_ended is False:
                    switches = options.reasoning_switches or {}
                    extra["reasoning_parser_kwargs"] = {"chat_template_kwargs": switches}
            stream = engine.generate(
                prompt,  # type: ignore[arg-type]  # a TokensPrompt
                params,
                request_id,
                lora_request=lora_request(adapter),
                **extra,
            )
            async with aclosing(stream):
                async for output in stream:
                    produced = True
                    yield generation_update(output, len(prompt_token_ids), options)
        except EngineDeadError as exc:
            raise EngineDead("the inference engine stopped") from exc
        except VLLMValidationError as exc:
            param = None
            if options.constraint is not None and raised_in(exc, STRUCTURED_CHECKS):
                param = options.constraint.param  # vLLM's error names no field for these
            raise EngineRejected(str(exc), param=param) from exc
        except REJECTED_ERRORS as exc:
            if produced:  # not the request: reading the engine's output failed
                raise EngineError(f"generation failed: {exc}") from exc
            raise EngineRejected(str(exc)) from exc
        except EngineGenerateError as exc:
            cause = exc.__cause__
            # AsyncLLM wraps what adding the request raised (encoding it for the engine core
            # included); before any output, that is the request being refused.
            if not produced and isinstance(cause, REJECTED_ERRORS):
                raise EngineRejected(f"the engine refused the request: {cause}") from exc
            raise EngineError(f"generation failed: {cause or exc}") from exc

    async def abort(self, request_id: str) -> None:
        if self._engine is not None and not self._engine.errored:
            await self._engine.abort(request_id)

    async def add_adapter(self, adapter: AdapterHandle) -> None:
        lora = lora_request(adapter)
        try:
            added = await self._while_alive(
                lambda engine: engine.add_lora(lora), "loading an adapter", ADAPTER_CALL_TIMEOUT_S
            )
        except (asyncio.CancelledError, EngineError):
            # The engine still carries out a load the gateway stopped waiting for (its caller
            # hung up, or it timed out): unload it after, in the engine's order, so that the
            # engine holds no adapter the gateway's cache does not count.
            self._unload_later(adapter.engine_id)
            raise
        if not added:
            raise EngineError(f"engine refused adapter {adapter.engine_name}")

    def start_adapter_load(self, adapter: AdapterHandle) -> Awaitable[None]:
        """add_adapter's call, sent before this returns (gateway.engine.vllm_utility)."""
        refused = f"engine refused adapter {adapter.engine_name}"
        return self._sent_now("add_lora", lora_request(adapter), "loading an adapter", refused)

    def start_adapter_removal(self, engine_id: int) -> Awaitable[None]:
        """remove_adapter's, sent now; False (it was not loaded) is no error."""
        return self._sent_now("remove_lora", engine_id, "removing an adapter")

    def _sent_now(
        self, method: str, arg: Any, what: str, refused: str | None = None
    ) -> Awaitable[None]:
        try:
            sent, answer = send_utility(self.engine, method, arg)
        except EngineDead as exc:
            return raised(exc)
        except Exception as exc:  # not sent: the caller's bookkeeping must see a failure
            return raised(EngineError(f"sending {method} failed: {exc}"))

        async def answered() -> None:
            try:
                await sent
            except Exception as exc:  # the socket is closed: the engine is gone
                raise EngineDead(f"the inference engine is not running: {exc}") from exc
            done = await self._while_alive(lambda _: answer, what, ADAPTER_CALL_TIMEOUT_S)
            if not done and refused is not None:
                raise EngineError(refused)

        return answered()

    def _unload_later(self, engine_id: int) -> None:
        engine = self._engine
        if engine is None or engine.errored:
            return
        task = asyncio.get_running_loop().create_task(engine.remove_lora(engine_id))
        self._unloads.add(task)
        task.add_done_callback(self._unloads.discard)

    async def remove_adapter(self, engine_id: int) -> None:
        await self._while_alive(
            lambda engine: engine.remove_lora(engine_id),
            "removing an adapter",
            ADAPTER_CALL_TIMEOUT_S,
        )

    async def _while_alive(
        self, call: Callable[[AsyncLLM], Awaitable[T]], what: str, timeout_s: float
    ) -> T:
        """An engine utility call that fails with EngineDead once the engine dies: vLLM never
        answers a call that was pending when its core died, and an adapter load waited on
        forever held every later request for that adapter too. EngineError after timeout_s."""
        from vllm.v1.engine.exceptions import EngineDeadError

        engine = self.engine
        if engine.errored:
            raise EngineDead("the inference engine is not running")
        pending = asyncio.ensure_future(call(engine))
        try:
            async with asyncio.timeout(timeout_s):
                while not pending.done():
                    await asyncio.wait({pending}, timeout=DEATH_POLL_S)
                    if not pending.done() and engine.errored:
                        raise EngineDead(f"the inference engine died while {what}")
            return pending.result()
        except EngineDeadError as exc:
            raise EngineDead(f"the inference engine died while {what}") from exc
        except TimeoutError as exc:
            raise EngineStalled(f"{what} took longer than {timeout_s:.0f} s") from exc
        finally:
            pending.cancel()

    async def health(self) -> EngineHealth:
        engine = self._engine
        if engine is None:
            return EngineHealth(alive=False, detail={"reason": "not started"})
        if engine.errored:
            return EngineHealth(alive=False, detail={"reason": "engine stopped"}, dead=True)
        try:
            # A call to an engine core that just died waits forever (vLLM notices the death
            # about a second later but never fails the pending call): bound the whole probe.
            async with asyncio.timeout(HEALTH_PROBE_TIMEOUT_S):
                await engine.check_health()
        except Exception as exc:  # any failure of the probe means not ready
            reason = "engine did not answer" if isinstance(exc, TimeoutError) else str(exc)
            return EngineHealth(alive=False, detail={"reason": f"health check failed: {reason}"})
        # Served on the unauthenticated /readyz: nothing about which adapters are loaded.
        return EngineHealth(
            alive=True, detail={"unfinished_requests": engine.get_num_unfinished_requests()}
        )

    async def adapter_pool(self) -> dict[str, Any] | None:
        engine = self._engine
        if engine is None or engine.errored:
            return None
        try:
            async with asyncio.timeout(HEALTH_PROBE_TIMEOUT_S):
                # A method loraplex's vLLM plugin adds to every worker (kernels.paged_stats).
                reports = await engine.collective_rpc("loraplex_paged_pool_stats")
        except Exception:
            logger.warning("could not read the paged adapter pool", exc_info=True)
            return None
        return next((r for r in reports if r), None)

    async def residency_waits(self) -> list[float]:
        engine = self._engine
        if engine is None or engine.errored:
            return []
        try:
            async with asyncio.timeout(HEALTH_PROBE_TIMEOUT_S):
                # A utility method loraplex's scheduler adds to the engine core, whose process
                # holds the scheduler (kernels.paged_scheduler); collective_rpc reaches only
                # the workers.
                waits = await engine.engine_core.call_utility_async("loraplex_residency_waits")
        except Exception:
            logger.warning("could not read the residency waits", exc_info=True)
            return []
        return [float(w) for w in waits]
