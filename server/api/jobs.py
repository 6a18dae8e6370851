"""Ingest jobs that outlive a crash: heartbeats, stale jobs reported failed, orphan uploads.

Every queued or running job of this process gets its ``updated`` time refreshed and its
upload folder's mtime touched every ``stale_s / 6`` seconds. A job whose heartbeat is
older than ``stale_s`` (``DAREX_JOB_STALE_S``) was left by a process that died: it is
reported ``failed`` with an "interrupted" error instead of ``running`` forever. Upload
folders that nothing wrote or touched for ``10 x stale_s`` are removed at start and on
every beat; an upload still streaming in writes its files, so it stays fresh. This works
the same with several replicas sharing one registry and data volume, since no replica
needs to know which other ones are alive.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path

from storage.registry import Job, Registry

log = logging.getLogger(__name__)

UPLOAD_STALE_FACTOR = 10  # an upload folder is abandoned after this many stale_s


def effective_job(job: Job, stale_s: float, now: float | None = None) -> Job:
    """The job as a client should see it: a silent queued/running job is ``failed``."""
    now = time.time() if now is None else now
    if job.state in ("queued", "running") and now - job.updated > stale_s:
        error = (
            f"interrupted: the server running this job stopped (no heartbeat for "
            f"{now - job.updated:.0f} s, limit {stale_s:g} s, DAREX_JOB_STALE_S); "
            f"model {job.model_id!r} was not stored, upload it again"
        )
        return job.model_copy(update={"state": "failed", "message": "interrupted", "error": error})
    return job


def _newest_mtime(folder: Path) -> float:
    newest = folder.stat().st_mtime
    for f in folder.rglob("*"):
        try:
            newest = max(newest, f.stat().st_mtime)
        except OSError:  # removed while we looked
            continue
    return newest


def sweep_uploads(uploads: Path, older_than_s: float, now: float | None = None) -> list[Path]:
    """Remove upload folders nothing wrote or touched for ``older_than_s``; returns them."""
    now = time.time() if now is None else now
    removed: list[Path] = []
    if not uploads.is_dir():
        return removed
    for folder in uploads.iterdir():
        try:
            if not folder.is_dir() or now - _newest_mtime(folder) <= older_than_s:
                continue
        except OSError:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
        log.warning("removed an abandoned upload", extra={"folder": str(folder)})
    return removed


class JobHeartbeat:
    """Keeps this process's live jobs fresh and sweeps abandoned uploads, on one thread."""

    def __init__(self, registry: Registry, uploads: Path, stale_s: float) -> None:
        self.registry = registry
        self.uploads = uploads
        self.stale_s = stale_s
        self.interval_s = stale_s / 6
        self._live: dict[str, Path] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="darex-job-heartbeat", daemon=True)

    def start(self) -> JobHeartbeat:
        self._sweep()
        self._thread.start()
        return self

    def add(self, job_id: str, folder: Path) -> None:
        with self._lock:
            self._live[job_id] = folder

    def discard(self, job_id: str) -> None:
        with self._lock:
            self._live.pop(job_id, None)

    def beat(self) -> None:
        with self._lock:
            live = list(self._live.items())
        for job_id, folder in live:
            with contextlib.suppress(OSError):  # the job finished and removed it
                os.utime(folder)
            try:
                self.registry.update_job(job_id)
            except Exception as e:  # registry down: the job may read as stale meanwhile
                log.warning("job heartbeat failed: %s", e, extra={"job_id": job_id})

    def _sweep(self) -> None:
        try:
            sweep_uploads(self.uploads, UPLOAD_STALE_FACTOR * self.stale_s)
        except OSError as e:
            log.warning("upload sweep failed: %s", e)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()
            self._sweep()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
