"""darex CLI: train commands."""
