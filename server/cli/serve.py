"""darex CLI: ``darex serve`` (the HTTP server) and ``darex config`` (effective settings)."""

from __future__ import annotations

import json

import typer

from server.cli import (
    app,
    check_data_dir,
    check_data_dir_can_be_made,
    check_port_free,
    cli_settings,
    error_exit,
)


@app.command()
def serve(
    host: str = typer.Option(None, help="Bind address (default: DAREX_HOST, 127.0.0.1)."),
    port: int = typer.Option(
        None, min=0, max=65535, help="Port, 0 = any free one (default: DAREX_PORT, 8000)."
    ),
    ray: bool = typer.Option(False, "--ray", help="Serve with Ray Serve model multiplexing."),
    replicas: int = typer.Option(1, min=1, help="Ray Serve replicas (with --ray)."),
    ray_address: str = typer.Option(
        None, help="Ray cluster address (with --ray); default: start a local instance."
    ),
) -> None:
    """Serve the resident base and every stored fine-tune over HTTP (OpenAI-compatible).

    Bad settings, a taken port, an unknown DAREX_BASE, a registry that cannot be opened and
    DAREX_DEVICE=cuda without a CUDA device are refused before the base loads.
    """
    try:
        _serve(host, port, ray, replicas, ray_address)
    except KeyboardInterrupt:  # Ctrl-C before uvicorn took over its signals
        raise typer.Exit(130) from None


def _serve(
    host: str | None, port: int | None, ray: bool, replicas: int, ray_address: str | None
) -> None:
    from server.logging import setup_logging
    from storage.bases import resolve_base
    from storage.errors import StorageError
    from storage.registry import open_registry

    settings = cli_settings()
    try:
        settings.check_serving()
    except ValueError as e:  # e.g. the default admin token outside development
        raise error_exit(str(e), 2) from None
    if host is not None or port is not None:
        settings = settings.model_copy(
            update={
                "host": host if host is not None else settings.host,
                "port": port if port is not None else settings.port,
            }
        )
    if settings.device == "cuda" and not ray:  # Ray replicas may run on other machines
        import torch

        if not torch.cuda.is_available():
            raise error_exit("DAREX_DEVICE is cuda, but torch sees no CUDA device here", 2)
    # the port and the base are checked before the data folder is made, so that a serve
    # refused for them leaves no new store behind
    check_data_dir_can_be_made(settings.data_dir)
    check_port_free(settings.host, settings.port)
    try:
        info = resolve_base(settings.base, settings.data_dir)
    except (StorageError, ValueError) as e:  # UnknownBase, BadCheckpoint: DAREX_BASE
        raise error_exit(f"DAREX_BASE: {type(e).__name__}: {e}", 2) from None
    except OSError as e:
        raise error_exit(f"DAREX_BASE: {type(e).__name__}: {e}", 1) from None
    check_data_dir(settings.data_dir, create=True)
    try:  # SQLite: a file that is not a database; Redis: nothing is sent yet
        open_registry(settings.registry).close()
    except (StorageError, ValueError) as e:
        where = "DAREX_REGISTRY_URL" if settings.registry_url else "the registry in DAREX_DATA_DIR"
        raise error_exit(f"{where}: {type(e).__name__}: {e}", 1) from None
    setup_logging(settings.log_level, settings.log_json)
    if ray:
        from server.ray_app import serve_ray

        serve_ray(settings, num_replicas=replicas, address=ray_address)
        return
    import uvicorn

    from server.api import create_app

    uvicorn.run(
        create_app(settings, base=info),
        host=settings.host,
        port=settings.port,
        log_config=None,  # our handler, one JSON line per record
        access_log=False,
    )


@app.command("config")
def show_config() -> None:
    """Print the effective settings (environment + .env + defaults), secrets masked."""
    from server.settings import Settings

    settings = cli_settings(Settings)
    out = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if hasattr(value, "get_secret_value"):
            value = "**********" if value.get_secret_value() else ""
        out[name] = value
    out["registry (effective)"] = settings.registry
    typer.echo(json.dumps(out, indent=2, default=str))
