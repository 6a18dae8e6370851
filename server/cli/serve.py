"""darex CLI: ``darex serve`` (the HTTP server) and ``darex config`` (effective settings)."""

from __future__ import annotations

import json

import typer

from server.cli import app


@app.command()
def serve(
    host: str = typer.Option(None, help="Bind address (default: DAREX_HOST, 127.0.0.1)."),
    port: int = typer.Option(None, help="Port (default: DAREX_PORT, 8000)."),
    ray: bool = typer.Option(False, "--ray", help="Serve with Ray Serve model multiplexing."),
    replicas: int = typer.Option(1, help="Ray Serve replicas (with --ray)."),
    ray_address: str = typer.Option(
        None, help="Ray cluster address (with --ray); default: start a local instance."
    ),
) -> None:
    """Serve the resident base and every stored fine-tune over HTTP (OpenAI-compatible)."""
    import uvicorn

    from server.api import create_app
    from server.logging import setup_logging
    from server.settings import get_settings

    try:
        settings = get_settings()
        settings.check_serving()
    except ValueError as e:  # e.g. the default admin token outside development
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    setup_logging(settings.log_level, settings.log_json)
    if host or port:
        settings = settings.model_copy(
            update={"host": host or settings.host, "port": port or settings.port}
        )
    if ray:
        from server.ray_app import serve_ray

        serve_ray(settings, num_replicas=replicas, address=ray_address)
        return
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,  # our handler, one JSON line per record
        access_log=False,
    )


@app.command("config")
def show_config() -> None:
    """Print the effective settings (environment + .env + defaults), secrets masked."""
    from server.settings import Settings

    try:
        settings = Settings()
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    out = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if hasattr(value, "get_secret_value"):
            value = "**********" if value.get_secret_value() else ""
        out[name] = value
    out["registry (effective)"] = settings.registry
    typer.echo(json.dumps(out, indent=2, default=str))
