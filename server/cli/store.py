"""darex CLI: store commands."""
