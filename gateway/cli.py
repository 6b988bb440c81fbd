"""`loraplex` command line: serve the gateway, build the demo world."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gateway.cli_admin import adapters_app, keys_app, tenants_app
from gateway.cli_rollout import faults_app, rollout_app

app = typer.Typer(help="loraplex: multi-tenant LoRA serving gateway.", no_args_is_help=True)
demo_app = typer.Typer(help="The local demo model and adapters.", no_args_is_help=True)
app.add_typer(demo_app, name="demo")
app.add_typer(adapters_app, name="adapters")
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
app.add_typer(rollout_app, name="rollout")
app.add_typer(faults_app, name="faults")


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

    from gateway.app import create_app
    from gateway.logging_config import configure_logging
    from gateway.settings import Settings

    overrides: dict[str, object] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    if demo:
        overrides["demo"] = True
    settings = Settings(**overrides)  # type: ignore[arg-type]
    configure_logging(settings.log_level, settings.log_json)

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

    uvicorn.run(
        create_app(settings, on_ready=announce),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=10,
        timeout_keep_alive=settings.http_keep_alive_s,
    )


@demo_app.command("init")
def demo_init(
    directory: Annotated[Path, typer.Argument(help="Where to write base/ and adapters/.")],
    force: Annotated[bool, typer.Option(help="Rebuild even if complete.")] = False,
) -> None:
    """Write the tiny demo base model, its tokenizer and the demo peft adapters."""
    from gateway.demo import DEMO_ADAPTERS, init_demo

    paths = init_demo(directory, force=force)
    typer.echo(f"base model: {paths.base}")
    for spec in DEMO_ADAPTERS:
        typer.echo(
            f"adapter {spec.name}: r={spec.rank} alpha={spec.alpha} "
            f"rslora={spec.use_rslora} modules={','.join(spec.target_modules)}"
        )


if __name__ == "__main__":
    app()
