"""model_id validation: a name that is safe as a registry key, a URL segment and a file name."""

from __future__ import annotations

import re

from storage.errors import InvalidModelId

MAX_MODEL_ID = 128
_ALLOWED = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")


def validate_model_id(model_id: object) -> str:
    """Return ``model_id`` or raise ``InvalidModelId`` saying why.

    Allowed: 1..128 characters from ``[A-Za-z0-9._:-]``, starting with a letter
    or digit, and no ``..`` anywhere (so it never names a parent directory).
    """
    if not isinstance(model_id, str):
        raise InvalidModelId(f"model_id must be a string, got {type(model_id).__name__}")
    if not model_id:
        raise InvalidModelId("model_id is empty")
    if len(model_id) > MAX_MODEL_ID:
        raise InvalidModelId(f"model_id has {len(model_id)} characters, at most {MAX_MODEL_ID}")
    if "/" in model_id or "\\" in model_id:
        raise InvalidModelId(f"model_id {model_id!r} contains a path separator")
    if ".." in model_id:
        raise InvalidModelId(f"model_id {model_id!r} contains '..'")
    if not _ALLOWED.fullmatch(model_id):
        raise InvalidModelId(
            f"model_id {model_id!r} must start with a letter or digit and use only "
            "letters, digits and . _ : -"
        )
    return model_id
