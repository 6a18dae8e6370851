"""The ``darex`` command line. Each submodule registers its commands on ``app``.

Error conventions: a usage error (a bad option value, a bad ``DAREX_*`` value, options
that conflict) exits 2 and a runtime failure (an unknown model, a corrupt store) exits 1,
with no traceback: one ``error: ...`` line on stderr, or typer's usage box naming the
option where a command checks its options as typer ``BadParameter`` (prune, finetune,
reproduce).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from server.settings import Settings

app = typer.Typer(
    name="darex",
    help="Serve many fine-tunes of one base model as DAREx-pruned sparse deltas.",
    no_args_is_help=True,
    add_completion=False,
)


def print_wide(renderable: object, min_width: int = 120) -> None:
    """Print a rich table at least ``min_width`` columns wide. Piped or in a CI log, rich
    assumes 80 columns and cuts cells to "…" (``Console.print(width=...)`` cannot
    widen past the console's own width, so this makes a wider console)."""
    from rich.console import Console

    Console(width=max(Console().width, min_width)).print(renderable)


def error_exit(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: <message>`` as one line on stderr; return the ``Exit`` to raise."""
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    return typer.Exit(code)


def file_problem(path: Path) -> str | None:
    """What is wrong with a text file an option names (a folder, missing, unreadable, not
    UTF-8), or None: the one wording of this check for every command."""
    if path.is_dir():
        return f"{path} is a folder; give a file"
    try:
        path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return f"{path}: no such file"
    except UnicodeDecodeError as e:
        return f"{path} is not UTF-8 text (byte {e.start}: {e.reason})"
    except OSError as e:
        return f"{path} cannot be read: {e.strerror or e}"
    return None


def cli_settings(factory: Callable[[], Settings] | None = None) -> Settings:
    """The settings (``get_settings()`` unless ``factory`` builds them); a bad ``DAREX_*``
    value exits 2 with one line naming the variable, what it expects and the value."""
    from pydantic import ValidationError

    from server.settings import describe_error, get_settings

    try:
        return (factory or get_settings)()
    except ValidationError as e:
        raise error_exit(describe_error(e), 2) from None
    except UnicodeDecodeError as e:  # the .env the settings read is not UTF-8
        raise error_exit(f".env: not UTF-8 text (byte {e.start}: {e.reason})", 2) from None
    except ValueError as e:  # pydantic_settings.SettingsError: e.g. an unreadable .env
        raise error_exit(str(e), 2) from None


def check_data_dir(data_dir: Path, *, create: bool) -> None:
    """``DAREX_DATA_DIR`` must be a folder. Commands that only read the store (``create``
    False) refuse a missing one rather than create it (a typo would show an empty store),
    and a folder that holds no store (no ``objects/``) rather than make one in it."""
    if data_dir.is_dir():
        if not create and not (data_dir / "objects").is_dir():
            raise error_exit(
                f"DAREX_DATA_DIR={data_dir} holds no store (no objects/ folder; "
                "`darex add` or `darex serve` makes one there)",
                2,
            )
        return
    if data_dir.exists():
        raise error_exit(f"DAREX_DATA_DIR={data_dir} is not a directory", 2)
    if not create:
        raise error_exit(
            f"DAREX_DATA_DIR={data_dir} does not exist (nothing stored there; "
            "`darex add` or `darex serve` creates it)",
            2,
        )
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error_exit(f"DAREX_DATA_DIR={data_dir}: cannot create it ({e.strerror})", 2) from None


def folder_problem(path: Path) -> str | None:
    """Why a folder cannot be made or written at ``path`` (a file there or above it, or no
    write permission in its nearest existing folder), or None: checked before a long run
    that writes there at its end."""
    if path.exists() and not path.is_dir():
        return f"{path} is a file; give a folder"
    from storage.blobs import nearest_existing

    where = nearest_existing(path)
    if not where.is_dir():
        return f"{path} cannot be made: {where} is a file, not a folder"
    if not os.access(where, os.W_OK | os.X_OK):
        return f"{path}: cannot write in {where}"
    return None


def check_data_dir_can_be_made(data_dir: Path) -> None:
    """``check_data_dir(create=True)`` without creating anything: an existing folder is
    checked as it would be; for a missing one, a file at or above it exits 2. Commands that
    create the store call this first, so that one refused for another reason leaves no new
    store behind."""
    if data_dir.exists():
        check_data_dir(data_dir, create=True)
        return
    from storage.blobs import nearest_existing

    where = nearest_existing(data_dir)
    if not where.is_dir():
        raise error_exit(
            f"DAREX_DATA_DIR={data_dir}: cannot create it ({where} is not a directory)", 2
        )


def check_port_free(host: str, port: int) -> int:
    """Bind ``host:port`` once and let go, so that a taken port is refused (exit 1) before
    a base is loaded rather than after. Port 0 (any free port) always passes. Returns the
    port bound: for port 0, the free one the system chose."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise error_exit(f"host {host!r} does not resolve ({e})", 2) from None
    family, kind, proto, _, addr = infos[0]
    try:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            sock.bind(addr)
            return int(sock.getsockname()[1])
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise error_exit(f"port {port} on {host} is in use", 1) from None
        raise error_exit(f"cannot bind {host}:{port} ({e.strerror or e})", 1) from None


def main() -> None:
    from server.cli import commands  # noqa: F401  (registers the commands)

    app()
