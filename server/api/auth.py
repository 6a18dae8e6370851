"""Bearer tokens: always for admin, for inference when ``DAREX_API_KEY`` is set; constant-time."""

from __future__ import annotations

import hmac

from fastapi import Request

from server.errors import Unauthorized


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def check_token(request: Request, expected: str, what: str) -> None:
    """Raise ``Unauthorized`` unless the request carries ``Authorization: Bearer <expected>``."""
    got = _bearer(request)
    if got is None:
        raise Unauthorized(f"missing bearer token for {what}")
    if not hmac.compare_digest(got.encode(), expected.encode()):
        raise Unauthorized(f"wrong bearer token for {what}")
