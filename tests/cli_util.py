"""Helpers for tests that drive the ``darex`` CLI through typer's CliRunner."""

from __future__ import annotations

from typer.testing import CliRunner, Result

from server.cli import app
from server.settings import get_settings

runner = CliRunner()


def run(*args: str) -> Result:
    """``darex ARGS``, reading the environment afresh as a new process would."""
    get_settings.cache_clear()
    return runner.invoke(app, list(args), catch_exceptions=False)


def one_line(output: str) -> str:
    """The single ``error: ...`` line a refusal prints (no traceback, no pydantic dump)."""
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith("error: "), output
    assert "Traceback" not in output and "pydantic.dev" not in output
    return lines[0]
