"""Streamed multipart upload: parts go straight to files in a temp folder, under a size limit.

FastAPI's ``UploadFile`` would spool the whole body before the route runs and
knows no total limit; here the request body is fed chunk by chunk to
``python_multipart``'s streaming parser, every file part is written to disk as
it arrives, and the upload stops with ``PayloadTooLarge`` the moment the body
passes ``max_bytes`` (or at once when ``Content-Length`` already says so).

A body that is not multipart (the parser's ``MultipartParseError``) or that ends
before its closing boundary (the parser does not check that itself) is refused with
``InvalidRequest`` on ``files``; either way every file opened so far is closed and the
temp folder removed.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from server.errors import InvalidRequest, PayloadTooLarge

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_FIELD_BYTES = 4096
FIELD_LIMITS = {"calib": 64 * 1024, "val": 1 << 20}  # calibration texts; labeled JSON lines
MAX_PARTS = 64


@dataclass
class Upload:
    """The saved files (by their own basename) and the plain form fields."""

    folder: Path
    files: dict[str, Path] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)
    nbytes: int = 0

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class _Part:
    def __init__(self) -> None:
        self.headers: dict[str, bytes] = {}
        self.name: str | None = None
        self.filename: str | None = None
        self.out: IO[bytes] | None = None
        self.value = bytearray()


def _safe_filename(raw: str) -> str:
    name = raw.replace("\\", "/").rsplit("/", 1)[-1]
    if not SAFE_NAME.fullmatch(name) or ".." in name:
        raise InvalidRequest(f"file name {raw!r} is not allowed", field="files")
    return name


async def receive_upload(
    content_type: str | None,
    content_length: str | None,
    body: AsyncIterator[bytes],
    max_bytes: int,
    tmp_root: Path | None = None,
) -> Upload:
    """Parse a multipart/form-data body into files on disk; the caller owns ``cleanup()``."""
    if content_length is not None and content_length.isdigit() and int(content_length) > max_bytes:
        raise PayloadTooLarge(f"upload of {int(content_length)} bytes exceeds {max_bytes} bytes")
    ctype, params = parse_options_header(content_type or "")
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise InvalidRequest("expected a multipart/form-data body", field="files")
    if tmp_root is not None:
        tmp_root.mkdir(parents=True, exist_ok=True)
    up = Upload(Path(tempfile.mkdtemp(prefix="upload-", dir=tmp_root)))
    cur = _Part()
    hdr_field, hdr_value = bytearray(), bytearray()
    parts = 0
    ended = False  # the closing boundary was read
    errors: list[Exception] = []

    def on_part_begin() -> None:
        nonlocal cur, parts
        cur = _Part()
        parts += 1

    def on_header_field(data: bytes, start: int, end: int) -> None:
        hdr_field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        hdr_value.extend(data[start:end])

    def on_header_end() -> None:
        cur.headers[hdr_field.decode("latin-1").lower()] = bytes(hdr_value)
        hdr_field.clear()
        hdr_value.clear()

    def on_headers_finished() -> None:
        _, disp = parse_options_header(cur.headers.get("content-disposition", b""))
        cur.name = disp.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in disp:
            cur.filename = _safe_filename(disp[b"filename"].decode("utf-8", "replace"))
            if cur.filename in up.files:
                raise InvalidRequest(f"file {cur.filename!r} sent twice", field="files")
            path = up.folder / cur.filename
            cur.out = path.open("wb")
            up.files[cur.filename] = path

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if cur.out is not None:
            cur.out.write(data[start:end])
        else:
            cur.value.extend(data[start:end])
            if len(cur.value) > FIELD_LIMITS.get(cur.name or "", MAX_FIELD_BYTES):
                raise InvalidRequest(f"form field {cur.name!r} is too long", field=cur.name)

    def on_part_end() -> None:
        if cur.out is not None:
            cur.out.close()
        elif cur.name:
            up.fields[cur.name] = cur.value.decode("utf-8", "replace")

    def on_end() -> None:
        nonlocal ended
        ended = True

    def guard(fn):  # parser callbacks must not raise through the C-less parser state
        def wrapped(*a):
            if not errors:
                try:
                    fn(*a)
                except Exception as e:
                    errors.append(e)

        return wrapped

    callbacks = {
        "on_part_begin": guard(on_part_begin),
        "on_header_field": guard(on_header_field),
        "on_header_value": guard(on_header_value),
        "on_header_end": guard(on_header_end),
        "on_headers_finished": guard(on_headers_finished),
        "on_part_data": guard(on_part_data),
        "on_part_end": guard(on_part_end),
        "on_end": guard(on_end),
    }
    parser = MultipartParser(params[b"boundary"], callbacks)  # type: ignore[arg-type]
    try:
        async for chunk in body:
            up.nbytes += len(chunk)
            if up.nbytes > max_bytes:
                raise PayloadTooLarge(f"upload exceeds {max_bytes} bytes")
            _write(parser, chunk)
            if errors:
                raise errors[0]
            if parts > MAX_PARTS:
                raise InvalidRequest(f"more than {MAX_PARTS} parts", field="files")
        parser.finalize()
        if errors:
            raise errors[0]
        if not ended:
            raise InvalidRequest(
                "multipart body ended before its closing boundary (cut off or badly framed)",
                field="files",
            )
    except BaseException as e:
        if cur.out is not None and not cur.out.closed:
            cur.out.close()
        up.cleanup()
        if isinstance(e, Exception) and not isinstance(e, PayloadTooLarge):
            await _drain(body, max_bytes - up.nbytes)
        raise
    return up


def _write(parser: MultipartParser, chunk: bytes) -> None:
    try:
        parser.write(chunk)
    except MultipartParseError as e:
        raise InvalidRequest(f"malformed multipart body: {e}", field="files") from None


async def _drain(body: AsyncIterator[bytes], limit: int) -> None:
    """Read and discard the rest of a refused upload (at most ``limit`` bytes).

    A server that answers before the client has sent its whole body and then closes
    the connection makes most clients report "connection reset" instead of the answer
    (a disk-full 507 arrived as a reset this way); reading the rest first lets the
    error response through. Bounded by the upload limit, so it cannot be abused.
    """
    try:
        async for chunk in body:
            limit -= len(chunk)
            if limit < 0:
                return
    except Exception:  # the client went away: nothing left to answer
        return
