"""darex CLI: ``darex serve`` (the HTTP server) and ``darex config`` (effective settings)."""

from __future__ import annotations

import json

import typer

from server.cli import app


@app.command()
def serve(
    host: str = typer.Option(None, help="Bind address (default: DAREX_HOST, 127.0.0.1)."),
    port: int = typer.Option(None, help="Port (default: DAREX_PORT, 8000)."),
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
    uvicorn.run(
        create_app(settings),
        host=host or settings.host,
        port=port or settings.port,
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
