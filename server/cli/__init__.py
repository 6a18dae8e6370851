"""The ``darex`` command line. Each submodule registers its commands on ``app``."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="darex",
    help="Serve many fine-tunes of one base model as DAREx-pruned sparse deltas.",
    no_args_is_help=True,
    add_completion=False,
)


def main() -> None:
    from server.cli import commands  # noqa: F401  (registers the commands)

    app()
