"""App factory: `create_app(settings)` wires routers, error handlers and the lifespan singletons."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from gateway.catalog import DirectoryCatalog, ModelCatalog
from gateway.engine.client import EngineClient
from gateway.errors import install_error_handlers
from gateway.http_utils import RequestIdMiddleware
from gateway.routes import chat, completions, health, models
from gateway.services.generation import GenerationService
from gateway.settings import Settings

logger = logging.getLogger(__name__)


def _load_tokenizer(path: str):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def create_app(
    settings: Settings,
    *,
    engine: EngineClient | None = None,
    on_ready: Callable[[FastAPI], None] | None = None,
) -> FastAPI:
    """Build the gateway. `engine` replaces the embedded vLLM (tests of pure HTTP logic)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.demo and settings.base_model is None:
            from gateway.demo import init_demo

            await asyncio.to_thread(init_demo, settings.demo_root)
        base_path = str(settings.resolved_base_model())
        model_name = settings.resolved_model_name()
        if engine is None:
            from gateway.engine.vllm_embedded import EmbeddedVLLM

            served_engine: EngineClient = EmbeddedVLLM(settings, base_path, model_name)
        else:
            served_engine = engine
        logger.info("starting engine for %s (served as %s)", base_path, model_name)
        await served_engine.start()
        try:
            catalog: ModelCatalog = DirectoryCatalog(
                model_name, settings.resolved_adapter_dir(), settings.max_lora_rank
            )
            tokenizer = await asyncio.to_thread(_load_tokenizer, base_path)
            app.state.catalog = catalog
            app.state.generation = GenerationService(served_engine, catalog, tokenizer)
            app.state.engine = served_engine
            names = [m.name for m in await catalog.list_models()]
            logger.info("loraplex ready; models: %s", ", ".join(names))
            if on_ready is not None:
                on_ready(app)
            yield
        finally:
            app.state.engine = None
            app.state.generation = None
            await served_engine.stop()

    app = FastAPI(
        title="loraplex",
        summary="Multi-tenant LoRA adapter serving gateway (OpenAI-compatible)",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = None
    app.add_middleware(RequestIdMiddleware)
    install_error_handlers(app)
    for router in (chat.router, completions.router, models.router, health.router):
        app.include_router(router)
    return app
