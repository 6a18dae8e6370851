"""darex CLI: serve commands."""
