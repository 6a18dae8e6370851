"""Content-addressed, immutable blobs: ``key = sha256(bytes)``, path ``objects/ab/cdef...``.

A write goes to ``tmp/`` (same filesystem), is fsynced, atomically renamed into
place and the directory is fsynced, so a reader never sees a partial blob and a
crash leaves at most a stale temp file. Reads re-hash and raise ``CorruptBlob``.
Identical bytes are stored once. Only ``delete`` (called by gc) removes a blob.

Re-putting bytes that are already stored compares them with the file (size, then
bytes) and atomically rewrites a file that no longer matches, so re-ingesting a
fine-tune repairs a corrupt blob; a match only refreshes the mtime (gc's grace).

``locked()`` is an advisory ``flock`` on ``root/blobs.lock``, across threads and
processes: ``put`` holds it shared while it decides to reuse a stored blob and
refreshes its mtime or writes it (so gc's temp sweep, exclusive, never meets a
write in flight), ``DeltaStore.register`` while it checks a manifest's blobs and
writes the registry entry, and ``DeltaStore.gc`` holds it exclusively while it
re-checks and deletes. So a blob gc is about to delete is either reused before gc
looks (gc then sees it young and keeps it) or found gone by the reuser (and
written again), never reused and then deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from storage.errors import CorruptBlob, StorageError

log = logging.getLogger(__name__)

_KEY = re.compile(r"[0-9a-f]{64}")


class MissingBlob(StorageError, KeyError):
    """No blob is stored under this key."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "missing blob"


def blob_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_key(key: str) -> str:
    if not _KEY.fullmatch(key):
        raise ValueError(f"not a blob key (64 lowercase hex digits): {key!r}")
    return key


def nearest_existing(path: Path) -> Path:
    """``path`` (made absolute) or its closest ancestor that exists: where a folder that
    is not there yet would be created, for checks made before creating it."""
    where = path.absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    return where


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(tmp: Path, dst: Path, data: bytes) -> None:
    """``dst`` holds ``data`` whole or not at all, across a crash or power loss: written to
    ``tmp`` (same filesystem), fsynced, renamed over ``dst``, the folder fsynced."""
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(dst.parent)


class BlobStore:
    """Immutable blobs under ``root/objects``; temp files under ``root/tmp``."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.lock_path = self.root / "blobs.lock"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def locked(self, *, exclusive: bool = False) -> Iterator[None]:
        """Hold the store's blob lock (shared by default; gc deletes under the exclusive one).

        Not re-entrant for the exclusive holder: do not call ``put``/``touch`` inside it.
        """
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    def path(self, key: str) -> Path:
        _check_key(key)
        return self.objects / key[:2] / key[2:]

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError as e:
            raise MissingBlob(f"blob {key} is not in the store") from e

    def put(self, data: bytes) -> str:
        """Store ``data`` once; returns its key.

        When the key is already stored and its file holds exactly ``data``, only
        the mtime is refreshed (gc grace); a file that vanished or no longer
        matches (corrupt, truncated) is written again, atomically.
        """
        key = blob_key(data)
        dst = self.path(key)
        # The shared lock is held through the write too: gc sweeps temp files under the
        # exclusive one, so it never unlinks the temp file of a write in flight.
        with self.locked():
            if self._reuse(key, dst, data):
                return key
            if not dst.parent.is_dir():
                dst.parent.mkdir(parents=True, exist_ok=True)
                fsync_dir(self.objects)  # the new shard folder survives a power loss
            # a concurrent writer of the same key writes equal bytes: the last rename wins
            write_atomic(self.tmp / f"{key}.{os.getpid()}.{uuid.uuid4().hex}.tmp", dst, data)
        return key

    def _reuse(self, key: str, dst: Path, data: bytes) -> bool:
        """True when ``dst`` holds ``data`` (mtime refreshed); False when it must be written."""
        try:
            if dst.stat().st_size == len(data) and dst.read_bytes() == data:
                os.utime(dst)  # an in-flight ingest uses it: keep it out of gc's grace window
                # its writer may have been killed before it synced the folders: a model
                # registered on it must not lose it to a power loss
                fsync_dir(dst.parent)
                fsync_dir(self.objects)
                return True
        except FileNotFoundError:
            return False
        log.warning("blob %s on disk does not match its key: writing it again", key)
        return False

    def touch(self, key: str) -> None:
        """Refresh the mtime (gc grace) of a stored blob; ``MissingBlob`` when it is gone.

        Call it under ``locked()``.
        """
        try:
            os.utime(self.path(key))
        except FileNotFoundError as e:
            raise MissingBlob(f"blob {key} is not in the store") from e

    def get(self, key: str) -> bytes:
        """The blob's bytes, re-hashed; ``CorruptBlob`` when they no longer match the key."""
        try:
            data = self.path(key).read_bytes()
        except FileNotFoundError as e:
            raise MissingBlob(f"blob {key} is not in the store") from e
        actual = blob_key(data)
        if actual != key:
            raise CorruptBlob(f"blob {key} is corrupt: its bytes hash to {actual}")
        return data

    def verify(self, key: str) -> bool:
        try:
            self.get(key)
        except (CorruptBlob, MissingBlob, OSError):
            return False
        return True

    def iter_keys(self) -> Iterator[str]:
        for sub in sorted(self.objects.iterdir()):
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            for f in sorted(sub.iterdir()):
                key = sub.name + f.name
                if _KEY.fullmatch(key):
                    yield key

    def delete(self, key: str) -> int:
        """Remove one blob; returns the bytes freed (0 when it was not there)."""
        p = self.path(key)
        try:
            size = p.stat().st_size
            p.unlink()
        except FileNotFoundError:
            return 0
        return size

    def age_s(self, key: str) -> float:
        return time.time() - self.path(key).stat().st_mtime

    def stale_temps(self, grace_s: float) -> list[Path]:
        now = time.time()
        out = []
        for f in self.tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if now - f.stat().st_mtime >= grace_s:
                    out.append(f)
        return out
