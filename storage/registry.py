"""Mutable names over immutable blobs: ``model_id -> manifest key``, plus ingest jobs.

One interface, two backends picked by URL in ``open_registry``:

- ``sqlite:///path/to/registry.sqlite3`` (``sqlite:////abs/path`` for an absolute
  path): embedded default, WAL mode, safe across threads and processes.
- ``redis://host:port/db``: shared by several replicas.

``registry_id()`` is the registry's own id, made once, when a store is first bound to
it: the store records the id of the registry its models are registered in, so a run
pointed at another registry is refused before ``gc`` deletes the blobs of models it
cannot see (``storage.store``).

``version()`` increments on every model change (set or delete), so a replica
can cache lookups for a short TTL and drop its cache when the version moved;
Redis also publishes the new version on ``<prefix>:models:changed``.
A backend that cannot be reached raises ``RegistryUnavailable``.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar

from pydantic import BaseModel

from storage.errors import (
    ModelExists,
    RegistryFull,
    RegistryUnavailable,
    UnknownJob,
    UnknownModel,
)

JobState = Literal["queued", "running", "done", "failed"]
JOB_STATES: tuple[str, ...] = ("queued", "running", "done", "failed")
JOB_TTL_S = 7 * 24 * 3600  # Redis keeps a job's status a week

P = ParamSpec("P")
R = TypeVar("R")


class Job(BaseModel):
    id: str
    model_id: str
    state: JobState = "queued"
    progress: float = 0.0  # 0..1
    message: str = ""
    error: str | None = None
    created: float
    updated: float


def _job_fields(
    state: str | None, progress: float | None, message: str | None, error: str | None
) -> dict[str, Any]:
    out: dict[str, Any] = {"updated": time.time()}
    if state is not None:
        if state not in JOB_STATES:
            raise ValueError(f"job state must be one of {JOB_STATES}, got {state!r}")
        out["state"] = state
    if progress is not None:
        out["progress"] = min(1.0, max(0.0, float(progress)))
    if message is not None:
        out["message"] = message
    if error is not None:
        out["error"] = error
    return out


class Registry(ABC):
    """``model_id -> manifest key`` and job status, behind one interface."""

    url: str

    @abstractmethod
    def set_model(self, model_id: str, manifest_key: str, *, replace: bool = False) -> None:
        """Register; raises ``ModelExists`` if the id is taken and ``replace`` is False."""

    @abstractmethod
    def get_model(self, model_id: str) -> str:
        """The manifest key; raises ``UnknownModel``."""

    @abstractmethod
    def delete_model(self, model_id: str, *, expected: str | None = None) -> bool:
        """True when something was deleted. ``expected``: delete only while the id points
        at this manifest key (a version uploaded meanwhile by another replica stays)."""

    @abstractmethod
    def list_models(self) -> dict[str, str]:
        """Every ``model_id -> manifest key``."""

    @abstractmethod
    def version(self) -> int:
        """A counter that grows on every model change."""

    @abstractmethod
    def registry_id(self, *, create: bool = False) -> str | None:
        """This registry's id, the same for every client; None when it has none yet,
        unless ``create`` (then one is made, once)."""

    @abstractmethod
    def create_job(self, model_id: str, message: str = "") -> Job: ...

    @abstractmethod
    def update_job(
        self,
        job_id: str,
        *,
        state: JobState | None = None,
        progress: float | None = None,
        message: str | None = None,
        error: str | None = None,
    ) -> Job: ...

    @abstractmethod
    def get_job(self, job_id: str) -> Job:
        """Raises ``UnknownJob``."""

    @abstractmethod
    def ping(self) -> bool:
        """True when reachable; raises ``RegistryUnavailable`` otherwise."""

    def close(self) -> None:  # noqa: B027  (optional for backends)
        """Release connections."""

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- SQLite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (model_id TEXT PRIMARY KEY, manifest_key TEXT NOT NULL,
                                   updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS info (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, model_id TEXT NOT NULL, state TEXT NOT NULL,
                                 progress REAL NOT NULL, message TEXT NOT NULL, error TEXT,
                                 created REAL NOT NULL, updated REAL NOT NULL);
INSERT OR IGNORE INTO meta (k, v) VALUES ('version', 0);
"""


def _sqlite_errors(fn: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as e:
            if getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                raise RegistryFull(
                    f"SQLite registry failed in {fn.__name__}: {e}; free space on its disk"
                ) from e
            raise RegistryUnavailable(f"SQLite registry failed in {fn.__name__}: {e}") from e

    return wrapper


_OPEN_TIMEOUT_S = 30.0  # how long an opener waits for a lock held by another process


class SQLiteRegistry(Registry):
    """One connection guarded by a lock; WAL lets other processes read while one writes."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path, timeout=_OPEN_TIMEOUT_S, check_same_thread=False, isolation_level=None
            )
            try:
                self._initialise(deadline=time.monotonic() + _OPEN_TIMEOUT_S)
            except BaseException:
                self._db.close()
                raise
        except (OSError, sqlite3.Error) as e:
            raise RegistryUnavailable(f"cannot open SQLite registry {self.path}: {e}") from e

    def _initialise(self, deadline: float) -> None:
        """Switch to WAL and create the schema, retrying while another opener holds the lock.

        SQLite does not call the busy handler when switching a fresh file to WAL
        or for the first schema write of a racing opener, so several processes
        opening a new registry at once get "database is locked" at once; retry
        with a short backoff until the connection timeout instead.
        """
        delay = 0.005
        while True:
            try:
                mode = self._db.execute("PRAGMA journal_mode").fetchone()[0]
                if str(mode).lower() != "wal":
                    self._db.execute("PRAGMA journal_mode=WAL")
                # FULL: a registration reported done survives a power loss too (NORMAL
                # keeps it across a crash of the process only); one fsync per write
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.executescript(_SCHEMA)
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.2)

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction, committed when the block ends without an error."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite has already rolled back after some errors (a full disk): a second
                # ROLLBACK would fail and hide the error that matters
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _write(self, statements: list[tuple[str, tuple[Any, ...]]]) -> list[int]:
        """Run statements in one IMMEDIATE transaction; returns each rowcount."""
        with self._transaction() as db:
            return [db.execute(sql, args).rowcount for sql, args in statements]

    @_sqlite_errors
    def set_model(self, model_id: str, manifest_key: str, *, replace: bool = False) -> None:
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        bump = ("UPDATE meta SET v = v + 1 WHERE k = 'version'", ())
        try:
            self._write(
                [
                    (
                        f"{verb} INTO models (model_id, manifest_key, updated) VALUES (?, ?, ?)",
                        (model_id, manifest_key, time.time()),
                    ),
                    bump,
                ]
            )
        except sqlite3.IntegrityError as e:
            raise ModelExists(f"model {model_id!r} is already registered") from e

    @_sqlite_errors
    def get_model(self, model_id: str) -> str:
        row = self._one("SELECT manifest_key FROM models WHERE model_id = ?", (model_id,))
        if row is None:
            raise UnknownModel(f"model {model_id!r} is not registered")
        return str(row[0])

    @_sqlite_errors
    def delete_model(self, model_id: str, *, expected: str | None = None) -> bool:
        with self._transaction() as db:
            n = db.execute(
                "DELETE FROM models WHERE model_id = ? AND (? IS NULL OR manifest_key = ?)",
                (model_id, expected, expected),
            ).rowcount
            if n:
                db.execute("UPDATE meta SET v = v + 1 WHERE k = 'version'")
        return n > 0

    @_sqlite_errors
    def list_models(self) -> dict[str, str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT model_id, manifest_key FROM models ORDER BY model_id"
            ).fetchall()
        return {m: k for m, k in rows}

    @_sqlite_errors
    def version(self) -> int:
        row = self._one("SELECT v FROM meta WHERE k = 'version'")
        return int(row[0]) if row else 0

    @_sqlite_errors
    def registry_id(self, *, create: bool = False) -> str | None:
        row = self._one("SELECT v FROM info WHERE k = 'id'")
        if row is None and create:
            new = uuid.uuid4().hex
            self._write([("INSERT OR IGNORE INTO info (k, v) VALUES ('id', ?)", (new,))])
            row = self._one("SELECT v FROM info WHERE k = 'id'")
        return str(row[0]) if row else None

    @_sqlite_errors
    def create_job(self, model_id: str, message: str = "") -> Job:
        now = time.time()
        job = Job(id=uuid.uuid4().hex, model_id=model_id, message=message, created=now, updated=now)
        self._write(
            [
                (
                    "INSERT INTO jobs (id, model_id, state, progress, message, error, created,"
                    " updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (job.id, model_id, job.state, 0.0, message, None, now, now),
                )
            ]
        )
        return job

    @_sqlite_errors
    def update_job(
        self,
        job_id: str,
        *,
        state: JobState | None = None,
        progress: float | None = None,
        message: str | None = None,
        error: str | None = None,
    ) -> Job:
        fields = _job_fields(state, progress, message, error)
        cols = ", ".join(f"{k} = ?" for k in fields)
        (n,) = self._write([(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))])
        if n == 0:
            raise UnknownJob(f"job {job_id!r} does not exist")
        return self.get_job(job_id)

    @_sqlite_errors
    def get_job(self, job_id: str) -> Job:
        row = self._one(
            "SELECT id, model_id, state, progress, message, error, created, updated"
            " FROM jobs WHERE id = ?",
            (job_id,),
        )
        if row is None:
            raise UnknownJob(f"job {job_id!r} does not exist")
        keys = ("id", "model_id", "state", "progress", "message", "error", "created", "updated")
        return Job(**dict(zip(keys, row, strict=True)))

    @_sqlite_errors
    def ping(self) -> bool:
        self._one("SELECT 1")
        return True

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.close()


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///path`` registry URL; None for another scheme."""
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def open_registry(url: str, *, prefix: str = "darex") -> Registry:
    """``sqlite:///path`` or ``redis://host:port/db`` (``rediss://`` too)."""
    if (path := sqlite_path(url)) is not None:
        return SQLiteRegistry(path)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from storage.redis_registry import RedisRegistry

        return RedisRegistry(url, prefix=prefix)
    raise ValueError(f"registry URL must start with sqlite:/// or redis://, got {url!r}")
