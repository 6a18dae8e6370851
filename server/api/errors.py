"""One mapping from domain exceptions to HTTP status and an OpenAI-shaped body.

Body: ``{"error": {"type", "message", "param", "code", "request_id"}}``. The
message says what and why (model_id, tensor, expected vs actual); a stack
trace never leaves the server, it goes to the log with the request id.
"""

from __future__ import annotations

import errno
import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from server.errors import (
    InvalidRequest,
    ModelBusy,
    ModelRetired,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    SchedulerClosed,
    Unauthorized,
    WeightsCorrupt,
    WrongTask,
)
from server.logging import model_id_var, request_id_var
from storage.blobs import MissingBlob
from storage.errors import (
    BadCheckpoint,
    BaseMismatch,
    CorruptBlob,
    IngestInProgress,
    InvalidModelId,
    ModelExists,
    RegistryCorrupt,
    RegistryFull,
    RegistryMismatch,
    RegistryUnavailable,
    UnknownBase,
    UnknownJob,
    UnknownModel,
    UnknownTask,
    UnsupportedFormat,
)

log = logging.getLogger(__name__)

# (exception, status, type, code); the first match wins, so subclasses come first.
ERROR_MAP: list[tuple[type[BaseException], int, str, str]] = [
    (UnknownModel, 404, "not_found_error", "model_not_found"),
    (ModelRetired, 404, "not_found_error", "model_not_found"),
    (UnknownJob, 404, "not_found_error", "job_not_found"),
    (Unauthorized, 401, "authentication_error", "invalid_api_key"),
    (PayloadTooLarge, 413, "invalid_request_error", "payload_too_large"),
    (BaseMismatch, 422, "invalid_request_error", "base_mismatch"),
    (BadCheckpoint, 422, "invalid_request_error", "bad_checkpoint"),
    (InvalidModelId, 422, "invalid_request_error", "invalid_model_id"),
    (UnknownBase, 422, "invalid_request_error", "unknown_base"),
    (UnknownTask, 422, "invalid_request_error", "unknown_task"),
    (WrongTask, 422, "invalid_request_error", "wrong_task"),
    (InvalidRequest, 422, "invalid_request_error", "invalid_request"),
    (ModelExists, 409, "invalid_request_error", "model_exists"),
    (IngestInProgress, 409, "invalid_request_error", "ingest_in_progress"),
    (RegistryFull, 507, "server_error", "insufficient_storage"),
    # data in the registry this version cannot read: a retry does not help
    (RegistryCorrupt, 500, "server_error", "registry_corrupt"),
    (RegistryUnavailable, 503, "service_unavailable", "registry_unavailable"),
    (NotReady, 503, "service_unavailable", "not_ready"),
    (SchedulerClosed, 503, "service_unavailable", "shutting_down"),
    (ModelBusy, 503, "service_unavailable", "model_busy"),
    (Overloaded, 503, "service_unavailable", "overloaded"),
    (WeightsCorrupt, 503, "service_unavailable", "weights_corrupt"),
    # the client closed the connection before its body arrived: nobody reads the answer,
    # and it is not the server's fault (nginx's 499, kept out of the 5xx counts)
    (ClientDisconnect, 499, "invalid_request_error", "client_disconnected"),
    (CorruptBlob, 500, "server_error", "corrupt_blob"),
    # a stored blob or manifest of a newer format: the store's problem, not the request's
    (UnsupportedFormat, 500, "server_error", "unsupported_format"),
    (RegistryMismatch, 500, "server_error", "registry_mismatch"),
    (MissingBlob, 500, "server_error", "missing_blob"),  # a registered model lost a blob
]


# the field an error is about when the exception does not say
_DEFAULT_PARAM = {
    "model_not_found": "model",
    "wrong_task": "model",
    "ingest_in_progress": "model_id",
    "invalid_model_id": "model_id",
    "model_exists": "model_id",
    "job_not_found": "job_id",
}


# what to say when the exception has no message (starlette's ClientDisconnect has none)
_DEFAULT_MESSAGE = {
    "client_disconnected": "the client closed the connection before its request was read",
}


def error_body(
    status: int, type_: str, message: str, code: str | None = None, param: str | None = None
) -> dict:
    return {
        "error": {
            "type": type_,
            "message": message,
            "param": param,
            "code": code,
            "request_id": request_id_var.get(),
        }
    }


def describe(exc: BaseException) -> tuple[int, dict]:
    """Status and body for any exception (500 with no internals for unexpected ones)."""
    for cls, status, type_, code in ERROR_MAP:
        if isinstance(exc, cls):
            param = getattr(exc, "field", None) or _DEFAULT_PARAM.get(code)
            message = str(exc) or _DEFAULT_MESSAGE.get(code, code)
            return status, error_body(status, type_, message, code, param)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        msg = "no space left on the data volume; free space or grow DAREX_DATA_DIR's disk"
        return 507, error_body(507, "server_error", msg, "insufficient_storage")
    rid = request_id_var.get()
    return 500, error_body(500, "server_error", f"internal error (request id {rid})", "internal")


def log_error(status: int, body: dict, exc: BaseException | None) -> None:
    err = body["error"]
    extra = {
        "status": status,
        "error_code": err["code"],
        "model_id": model_id_var.get(),
        "request_id": request_id_var.get(),
    }
    if status >= 500:
        log.error("request failed: %s", err["message"], exc_info=exc, extra=extra)
    else:
        log.warning("request refused: %s", err["message"], extra=extra)


def error_response(exc: BaseException) -> JSONResponse:
    """The logged answer to ``exc``, in the shape of every error (the Ray ingress too)."""
    status, body = describe(exc)
    log_error(status, body, exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


async def _domain_handler(request: Request, exc: Exception) -> JSONResponse:
    return error_response(exc)


def _is_tag(part: object) -> bool:
    """A union branch pydantic names in an error's location (``str``, ``list[str]``)."""
    if not isinstance(part, str):
        return False
    return part in _SCALAR_TAGS or re.fullmatch(r"[\w-]+\[.*\]", part) is not None


_SCALAR_TAGS = frozenset({"str", "int", "float", "bool", "none", "bytes"})


def _loc(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header") and not _is_tag(p)]
    return ".".join(parts) or ".".join(str(p) for p in loc)


def _branch_errors(errs: list[dict]) -> list[dict]:
    """pydantic reports every branch of a union: for ``["a", null]`` against ``str |
    list[str]``, "not a string" on the ``str`` branch and "item 1: not a string" on the
    list's. A branch whose outer type did not even match is dropped when another branch
    got further, so the error names the item that is wrong."""
    keep = []
    for e in errs:
        loc = e["loc"]
        i = next((k for k, part in enumerate(loc) if _is_tag(part)), None)
        if i is not None and len(loc) == i + 1 and e["type"].endswith("_type"):
            deeper = (o["loc"][:i] == loc[:i] and len(o["loc"]) > i + 1 for o in errs)
            if any(deeper):
                continue
        keep.append(e)
    return keep or errs


def describe_validation(errors: list[Any]) -> tuple[str, str | None]:
    """``(message, param)`` of pydantic's errors for a request body: every error as
    ``field: what``, ``param`` the first field (None when the body is not JSON)."""
    errs = _branch_errors(list(errors))
    bad_json = next((e for e in errs if e["type"] == "json_invalid"), None)
    if bad_json is not None:  # the location is a character offset, not a field
        why = (bad_json.get("ctx") or {}).get("error", "cannot be parsed")
        return f"the body is not valid JSON: {why} at character {bad_json['loc'][-1]}", None
    message = "; ".join(f"{_loc(e['loc'])}: {e['msg']}" for e in errs)
    return message or "invalid request", _loc(errs[0]["loc"]) if errs else None


def unparsable_body(exc: BaseException) -> str | None:
    """Why a body is not JSON, for what ``json.loads`` raises on it (None: not that)."""
    if isinstance(exc, UnicodeDecodeError):
        byte = exc.object[exc.start]
        return f"the body is not valid UTF-8: byte 0x{byte:02x} at position {exc.start}"
    if isinstance(exc, RecursionError):
        return "the body nests too deeply to be parsed"
    if isinstance(exc, json.JSONDecodeError):
        return f"the body is not valid JSON: {exc.msg} at character {exc.pos}"
    return None


async def _validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    body_in = getattr(exc, "body", None)
    if isinstance(body_in, dict) and isinstance(body_in.get("model"), str):
        model_id_var.set(body_in["model"][:200])
    message, param = describe_validation(list(exc.errors()))
    body = error_body(422, "invalid_request_error", message, "invalid_request", param)
    log_error(422, body, None)
    return JSONResponse(body, status_code=422)


def _fastapi_parse_error(exc: StarletteHTTPException) -> str | None:
    """What was wrong with a body FastAPI could not parse (its 400 says only that)."""
    cause = exc.__cause__
    if exc.status_code != 400 or cause is None or exc.detail != _FASTAPI_UNPARSED:
        return None
    return unparsable_body(cause) or f"the body cannot be parsed: {type(cause).__name__}"


_FASTAPI_UNPARSED = "There was an error parsing the body"
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


async def _http_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc.__cause__, ClientDisconnect):  # gone while FastAPI read the JSON
        return error_response(exc.__cause__)
    if (why := _fastapi_parse_error(exc)) is not None:
        body = error_body(422, "invalid_request_error", why, "invalid_request")
        log_error(422, body, None)
        return JSONResponse(body, status_code=422)
    type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    code = _HTTP_CODES.get(exc.status_code)
    body = error_body(exc.status_code, type_, str(exc.detail), code)
    log_error(exc.status_code, body, None)
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_handler)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_handler)  # type: ignore[arg-type]
    for cls in {c for c, *_ in ERROR_MAP}:
        app.add_exception_handler(cls, _domain_handler)
    # OSError gets its own handler so a full disk (507) is answered by the exception
    # middleware; the catch-all below runs in Starlette's ServerErrorMiddleware, which
    # re-raises after answering, and the server then drops the keep-alive connection.
    app.add_exception_handler(OSError, _domain_handler)
    app.add_exception_handler(Exception, _domain_handler)  # 500, no internals to the client
