"""Routers per audience: inference (OpenAI-compatible, classify), admin, operations."""
