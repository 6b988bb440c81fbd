"""`loraplex` command line: serve the gateway, build the demo world."""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from gateway.cli_admin import adapters_app, keys_app, tenants_app
from gateway.cli_card import card_app
from gateway.cli_costs import break_even
from gateway.cli_datasets import datasets_app
from gateway.cli_eval import eval_app
from gateway.cli_merge import merge
from gateway.cli_rollout import faults_app, rollout_app
from gateway.cli_weights import add_weight_commands

if TYPE_CHECKING:
    from gateway.settings import Settings

logger = logging.getLogger(__name__)

app = typer.Typer(help="loraplex: multi-tenant LoRA serving gateway.", no_args_is_help=True)
demo_app = typer.Typer(help="The local demo model and adapters.", no_args_is_help=True)
app.add_typer(demo_app, name="demo")
add_weight_commands(adapters_app)
app.add_typer(adapters_app, name="adapters")
app.add_typer(datasets_app, name="datasets")
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
app.add_typer(rollout_app, name="rollout")
app.add_typer(faults_app, name="faults")
app.add_typer(eval_app, name="eval")
app.add_typer(card_app, name="card")
app.command("break-even")(break_even)
app.command("merge")(merge)


def load_settings(overrides: dict[str, object]) -> Settings:
    """Settings from the environment and options, or exit 2 naming each mistake (a mistyped
    value is the operator's to fix, not a traceback to read)."""
    from pydantic import ValidationError

    from gateway.settings import ENV_PREFIX, Settings

    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        typer.echo(f"error: {exc.error_count()} invalid setting(s):", err=True)
        # include_input=False: a refused value may be a token.
        for error in exc.errors(include_input=False):
            field = ".".join(str(part) for part in error["loc"])
            where = f"{field} ({ENV_PREFIX}{field.upper()}): " if field else ""
            typer.echo(f"  {where}{error['msg']}", err=True)
        raise typer.Exit(2) from None


def warn_unknown_environment() -> None:
    from gateway.settings import ENV_PREFIX, OTHER_ENV_NAMES, Settings, unknown_environment

    known = [f"{ENV_PREFIX}{name}".upper() for name in Settings.model_fields]
    for name in unknown_environment(os.environ):
        close = difflib.get_close_matches(name.upper(), [*known, *OTHER_ENV_NAMES], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        logger.warning("%s is not a loraplex setting and is ignored%s", name, hint)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (LORAPLEX_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (LORAPLEX_PORT).")] = None,
    demo: Annotated[
        bool, typer.Option("--demo", help="Create and serve the demo model and adapters.")
    ] = False,
) -> None:
    """Start the OpenAI-compatible gateway with its embedded vLLM engine."""
    import uvicorn
    from fastapi import FastAPI

    from gateway.app import create_app
    from gateway.logging_config import configure_logging
    from gateway.shutdown import (
        ENGINE_DIED_EXIT_CODE,
        STARTUP_FAILED_EXIT_CODE,
        DrainingServer,
        StartupGuard,
    )

    overrides: dict[str, object] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    if demo:
        overrides["demo"] = True
    settings = load_settings(overrides)
    configure_logging(settings.log_level, settings.log_json)
    warn_unknown_environment()

    def announce(fastapi_app: object) -> None:
        base = f"http://{settings.host}:{settings.port}"
        typer.echo(f"\nloraplex is serving at {base}/v1  (docs: {base}/docs)")
        key = getattr(getattr(fastapi_app, "state", None), "demo_api_key", None)
        if settings.demo and key:
            # The one place a key is printed: demo mode, to the operator's own terminal.
            typer.echo(
                f"Demo tenant `demo`, API key: {key}\n"
                "Try it:\n"
                f"  export LORAPLEX_KEY={key}\n"
                f'  curl -s {base}/v1/models -H "Authorization: Bearer $LORAPLEX_KEY"\n'
                f'  curl -s {base}/v1/chat/completions -H "Authorization: Bearer $LORAPLEX_KEY" '
                "\\\n    -H 'Content-Type: application/json' \\\n"
                '    -d \'{"model": "demo-qkvo-r8", "max_tokens": 24, '
                '"messages": [{"role": "user", "content": "Hello!"}]}\'\n'
            )

    server: DrainingServer | None = None

    def engine_died(fastapi_app: FastAPI) -> None:
        fastapi_app.state.exit_code = ENGINE_DIED_EXIT_CODE
        if server is not None:
            server.drain_then_stop()  # then exit non-zero: the orchestrator starts a fresh one

    startup = StartupGuard()
    fastapi_app = create_app(
        settings, on_ready=announce, on_engine_death=engine_died, startup=startup
    )
    config = uvicorn.Config(
        fastapi_app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),  # one of settings.LOG_LEVELS: uvicorn knows each
        timeout_graceful_shutdown=settings.shutdown_grace_s,
        timeout_keep_alive=settings.http_keep_alive_s,
    )
    server = DrainingServer(
        config,
        drain=lambda: setattr(fastapi_app.state, "draining", True),
        drain_s=settings.shutdown_drain_s,
        startup=startup,
    )
    server.run()
    if not server.started:
        raise typer.Exit(STARTUP_FAILED_EXIT_CODE)  # as uvicorn.run does
    code = getattr(fastapi_app.state, "exit_code", 0)
    if code:
        raise typer.Exit(code)


@demo_app.command("init")
def demo_init(
    directory: Annotated[Path, typer.Argument(help="Where to write base/ and adapters/.")],
    force: Annotated[bool, typer.Option(help="Rebuild even if complete.")] = False,
) -> None:
    """Write the tiny demo base model, its tokenizer and the demo peft adapters."""
    from gateway.demo import DEMO_ADAPTERS, init_demo

    try:
        paths = init_demo(directory, force=force)
    except OSError as exc:
        typer.echo(f"error: cannot write the demo under {directory}: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"base model: {paths.base}")
    for spec in DEMO_ADAPTERS:
        typer.echo(
            f"adapter {spec.name}: r={spec.rank} alpha={spec.alpha} "
            f"rslora={spec.use_rslora} modules={','.join(spec.target_modules)}"
        )


if __name__ == "__main__":
    app()
