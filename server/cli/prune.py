"""darex CLI: prune commands."""
