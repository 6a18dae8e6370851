"""Imports every command module so that each registers its commands on ``server.cli.app``."""

from server.cli import lab, prune, serve, store, train  # noqa: F401
