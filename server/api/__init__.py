"""HTTP layer: ``create_app`` builds the FastAPI app over an engine and its scheduler."""

from server.api.app import create_app

__all__ = ["create_app"]
