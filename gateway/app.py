"""App factory: `create_app(settings)` wires routers, error handlers and the lifespan singletons."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from gateway.adapter_cache import HostAdapterCache
from gateway.admin_auth import AdminGate
from gateway.auth import KeyAuthenticator
from gateway.body_limit import BodySizeLimit, limits_by_route
from gateway.catalog import RegistryCatalog
from gateway.engine.client import EngineClient
from gateway.engine.reasoning_parsing import ReasoningParsing
from gateway.engine.tool_parsing import ToolCallParsing
from gateway.errors import install_error_handlers
from gateway.faults import FaultInjector
from gateway.feedback_ids import ResponseIds
from gateway.http_utils import RequestIdMiddleware
from gateway.limits import AdmissionLimits, TenantLimiter
from gateway.metrics import ENGINE_UP
from gateway.prompt_drift import PromptDrift, registry_cards
from gateway.registry_runtime import (
    adapter_demand,
    ensure_start_key,
    import_adapter_dir,
    open_registry,
)
from gateway.registry_watch import RegistryWatch
from gateway.request_metrics import RequestMetricsMiddleware
from gateway.rollout_controller import RolloutController
from gateway.rollout_router import RolloutRouter
from gateway.routes import (
    admin_adapters,
    admin_datasets,
    admin_faults,
    admin_registry,
    admin_rollouts,
    admin_tenants,
    chat,
    completions,
    feedback,
    health,
    metrics,
    models,
)
from gateway.services.adapter_admin import AdapterAdmin, S3Import
from gateway.services.dataset_admin import DatasetAdmin
from gateway.services.eval_evidence import EvalEvidence
from gateway.services.feedback import FeedbackService
from gateway.services.generation import GenerationService
from gateway.services.rollout_admin import RolloutAdmin
from gateway.services.tenant_admin import TenantAdmin
from gateway.settings import Settings
from gateway.shadow import ShadowMirror
from gateway.shared_limits import SharedLimiter
from gateway.shutdown import StartupGuard, watch_engine
from gateway.tenant_gate import TenantGate
from registry.compat import safetensors_dtype
from registry.rollout import Thresholds

logger = logging.getLogger(__name__)


def _load_tokenizer(path: str):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer
    from vllm.tokenizers.hf import get_cached_tokenizer

    # vLLM's own proxy, as its server uses: the vocabulary and special ids read once.
    # Reasoning and tool-call parsers are built per choice and read get_vocab() as they are:
    # with a 151k-token vocabulary each build took 77 ms of the event loop, 0.02 ms cached.
    return get_cached_tokenizer(AutoTokenizer.from_pretrained(path))


def freeze_startup_heap() -> None:
    """Move what start-up built (torch, transformers, the tokenizer, the app: ~480k objects
    with the demo model) out of the garbage collector's reach. A full collection over them
    paused the event loop for ~250 ms, every stream with it, a few times a minute under load
    (a burst of 16 first requests took 350 ms with one, 100 ms without). vLLM's own server
    does the same after its start-up."""
    gc.collect()
    gc.freeze()


def create_app(
    settings: Settings,
    *,
    engine: EngineClient | None = None,
    on_ready: Callable[[FastAPI], None] | None = None,
    on_engine_death: Callable[[FastAPI], None] | None = None,
    startup: StartupGuard | None = None,
) -> FastAPI:
    """Build the gateway. `engine` replaces the embedded vLLM (tests of pure HTTP logic).
    `on_engine_death`: called once if the engine dies for good after start-up (the CLI stops
    the server then, see gateway.shutdown); without it the gateway only answers 503.
    `startup`: lets a signal stop the engine's start (the CLI's server requests it)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.demo and settings.base_model is None:
            from gateway.demo import init_demo

            await asyncio.to_thread(init_demo, settings.demo_root)
        if settings.metrics_token is None and settings.admin_token is None:
            logger.warning(
                "neither LORAPLEX_METRICS_TOKEN nor LORAPLEX_ADMIN_TOKEN is set: /metrics, "
                "which names every tenant's adapters, is open to anyone who reaches this port"
            )
        base_path = str(settings.resolved_base_model())
        model_name = settings.resolved_model_name()
        # Registry first: a base that differs from the one registered under its name stops
        # start-up here, before any engine resources are spent.
        polling: asyncio.Task[None] | None = None
        watching: asyncio.Task[None] | None = None
        engine_watch: asyncio.Task[None] | None = None
        controller: RolloutController | None = None
        catalog: RegistryCatalog | None = None
        authenticator: KeyAuthenticator | None = None
        mirror: ShadowMirror | None = None
        shared_limits: SharedLimiter | None = None
        registry = await open_registry(settings, Path(base_path), model_name)
        served_engine: EngineClient
        embedded = None
        if engine is None:
            from gateway.engine.vllm_embedded import EmbeddedVLLM

            served_engine = embedded = EmbeddedVLLM(settings, base_path, model_name)
        else:
            served_engine = engine
        try:
            import_dir = settings.resolved_adapter_dir()
            if import_dir is not None:
                await import_adapter_dir(registry, import_dir, settings.resolved_import_tenant())
            if settings.demo:
                app.state.demo_api_key = await ensure_start_key(
                    registry, settings.resolved_import_tenant(), settings.demo_api_key
                )
            elif settings.import_api_key is not None:
                await ensure_start_key(
                    registry, settings.resolved_import_tenant(), settings.import_api_key
                )
            if embedded is not None and settings.paged_lora:
                embedded.paged_demand = await adapter_demand(registry)
            # Before the engine: a parser the tokenizer cannot serve stops start-up at once.
            tokenizer = await asyncio.to_thread(_load_tokenizer, base_path)
            tool_parsing = (
                await asyncio.to_thread(
                    ToolCallParsing,
                    settings.tool_call_parser,
                    tokenizer,
                    structural_tags=settings.structured_outputs_backend == "xgrammar",
                    compact_json=settings.structured_outputs_compact_json,
                )
                if settings.tool_call_parser
                else None
            )
            reasoning_parsing = (
                await asyncio.to_thread(
                    ReasoningParsing,
                    settings.reasoning_parser,
                    tokenizer,
                    tool_call_parser=settings.tool_call_parser,
                )
                if settings.reasoning_parser
                else None
            )
            logger.info("starting engine for %s (served as %s)", base_path, model_name)
            if startup is None:
                await served_engine.start()
            else:
                await startup.run(served_engine.start())
            ENGINE_UP.set(1)
            # From here on the gate judges adapters' values against the dtype vLLM resolved.
            registry.engine_dtype = safetensors_dtype(served_engine.lora_dtype) or (
                registry.engine_dtype
            )
            router = RolloutRouter(registry, poll_interval_s=settings.rollout_poll_interval_s)
            catalog = RegistryCatalog(registry, settings.catalog_cache_ttl_s, router)
            router.on_change = catalog.invalidate
            await router.refresh()
            polling = asyncio.create_task(router.run(), name="rollout-poll")
            authenticator = KeyAuthenticator(registry, settings.catalog_cache_ttl_s)
            cache = HostAdapterCache(
                served_engine,
                settings.adapter_cache_bytes,
                max(settings.max_cpu_loras, settings.max_loras),  # vLLM's own ceiling
            )
            limiter: AdmissionLimits = TenantLimiter()
            if settings.limits_redis_url is not None:
                limiter = shared_limits = SharedLimiter(
                    settings.limits_redis_url.get_secret_value(),
                    prefix=settings.limits_redis_prefix,
                )
                await shared_limits.start()
            adapter_admin = AdapterAdmin(
                registry,
                cache,
                catalog,
                settings.upload_max_bytes,
                settings.import_roots,
                S3Import(settings.s3_import_buckets, settings.s3_endpoint_url, settings.s3_region),
            )
            watch = RegistryWatch(
                registry,
                [
                    catalog.invalidate,
                    authenticator.invalidate,
                    router.mark_stale,  # a write whose stamp the newest one hides
                    adapter_admin.forget_removed,  # retired or deleted through another replica
                ],
                poll_interval_s=settings.rollout_poll_interval_s,
            )
            try:
                await watch.check()  # records the generation; the caches start empty anyway
            except Exception:  # the registry was just used: a blip, which run() retries
                logger.warning("first registry change poll failed", exc_info=True)
            watching = asyncio.create_task(watch.run(), name="registry-watch")
            app.state.registry = registry
            app.state.catalog = catalog
            app.state.rollout_router = router  # tests replay a lagging replica's view
            app.state.adapter_admin = adapter_admin
            app.state.dataset_admin = DatasetAdmin(registry, adapter_admin)
            app.state.authenticator = authenticator
            app.state.tenant_admin = TenantAdmin(registry, authenticator, catalog)
            defaults = Thresholds(
                window=settings.rollout_window,
                max_error_rate=settings.rollout_max_error_rate,
                margin_ms=settings.rollout_margin_ms,
                max_p95_ttft_ms=settings.rollout_max_p95_ttft_ms,
                max_p95_e2e_ms=settings.rollout_max_p95_e2e_ms,
                min_task_success=settings.rollout_min_task_success,
                min_tool_call_validity=settings.rollout_min_tool_call_validity,
            )
            controller = RolloutController(
                registry, router, defaults, auto_promote=settings.rollout_auto_promote
            )
            app.state.rollout_admin = RolloutAdmin(registry, router, controller)
            response_ids = _response_ids(settings)
            app.state.response_ids = response_ids
            app.state.feedback = FeedbackService(
                response_ids, registry, controller, model_name, settings.feedback_max_age_s
            )
            app.state.eval_evidence = EvalEvidence(
                response_ids,
                registry,
                settings.feedback_max_age_s,
                requires_ngram_filters=settings.evaluate_requires_ngram_filters,
            )
            faults = FaultInjector() if settings.enable_faults else None
            app.state.faults = faults
            mirror = ShadowMirror(
                served_engine,
                catalog,
                router,
                cache,
                controller,
                faults,
                max_inflight=settings.shadow_max_inflight,
            )
            app.state.prompt_drift = drift = PromptDrift(
                sample_rate=settings.drift_sample_rate,
                max_prompt_tokens=settings.drift_max_prompt_tokens,
                reference_samples=settings.drift_reference_samples,
                card_of=registry_cards(registry),
            )
            await drift.warm_up(served_engine)
            app.state.generation = GenerationService(
                served_engine,
                catalog,
                tokenizer,
                limiter,
                cache,
                controller,
                faults,
                mirror,
                prefix_cache_per_tenant=settings.prefix_cache_scope == "tenant",
                response_ids=response_ids,
                loop_guard=settings.loop_guard(),
                grammar_ends_at_stop_tokens=settings.structured_outputs_backend == "xgrammar",
                tool_parsing=tool_parsing,
                reasoning_parsing=reasoning_parsing,
                drift=drift,
                echo_logprobs_max_prompt_tokens=settings.echo_logprobs_max_prompt_tokens,
            )
            app.state.engine = served_engine
            freeze_startup_heap()
            logger.info("loraplex ready: serving %s", model_name)
            if on_ready is not None:
                on_ready(app)
            if on_engine_death is not None:
                engine_watch = asyncio.create_task(
                    watch_engine(served_engine, lambda: on_engine_death(app)),
                    name="engine-watch",
                )
            yield
        finally:
            for task in (polling, watching, engine_watch):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            if mirror is not None:
                await mirror.close()  # before the engine stops under its requests
            if controller is not None:
                await controller.close()
            if shared_limits is not None:
                await shared_limits.close()
            for registry_cache in (catalog, authenticator):
                if registry_cache is not None:
                    await registry_cache.close()  # its outage probe, before the registry closes
            for name in (
                "engine",
                "generation",
                "catalog",
                "adapter_admin",
                "dataset_admin",
                "authenticator",
                "tenant_admin",
                "rollout_admin",
                "feedback",
                "registry",
            ):
                setattr(app.state, name, None)
            ENGINE_UP.set(0)
            await served_engine.stop()
            await registry.close()

    app = FastAPI(
        title="loraplex",
        summary="Multi-tenant LoRA adapter serving gateway (OpenAI-compatible)",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = None
    app.state.authenticator = None
    app.state.demo_api_key = None
    # Last added runs first. The request id comes first, so every answer carries it (a 413,
    # an early admin refusal); an anonymous /admin/* call is answered before its body is read;
    # a body over its limit is refused before metrics label it or any route reads it; a /v1
    # call's key is verified before its body is read, and its 401 counted as the route's was.
    app.add_middleware(TenantGate)
    app.add_middleware(RequestMetricsMiddleware)
    app.add_middleware(
        BodySizeLimit,
        limit_for=limits_by_route(
            settings.upload_max_bytes,
            settings.max_request_bytes,
            settings.admin_token,
            settings.ngram_filter_max_bytes,
        ),
    )
    app.add_middleware(AdminGate)
    app.add_middleware(RequestIdMiddleware)
    install_error_handlers(app)
    routers = (
        chat.router,
        completions.router,
        feedback.router,
        models.router,
        health.router,
        admin_adapters.router,
        admin_datasets.router,
        admin_registry.router,
        admin_tenants.router,
        admin_rollouts.router,
        metrics.router,
    )
    for router in routers:
        app.include_router(router)
    if settings.enable_faults:
        app.include_router(admin_faults.router)
    return app


def _response_ids(settings: Settings) -> ResponseIds:
    secret = settings.feedback_secret
    if secret is None:
        logger.warning(
            "LORAPLEX_FEEDBACK_SECRET is unset: response ids are signed with a random key, so "
            "POST /v1/feedback accepts only this process's responses, until it restarts"
        )
        return ResponseIds()
    return ResponseIds(secret.get_secret_value().encode())
