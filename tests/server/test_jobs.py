"""Ingest jobs after a crash: heartbeats keep live jobs fresh, silent ones read as failed,
abandoned upload folders are swept; through the real app and a real SQLite registry."""

from __future__ import annotations

import os
import time
from pathlib import Path

from fastapi.testclient import TestClient

from server.api import create_app
from server.api.jobs import JobHeartbeat, effective_job, sweep_uploads
from storage.registry import open_registry
from tests.server.live import ADMIN_TOKEN, make_settings

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def test_effective_job_fails_only_silent_unfinished_jobs(tmp_path: Path) -> None:
    with open_registry(f"sqlite:///{tmp_path / 'r.sqlite3'}") as reg:
        job = reg.create_job("ft-a", "queued")
        later = job.updated + 100
        assert effective_job(job, stale_s=200, now=later) == job
        stale = effective_job(job, stale_s=50, now=later)
        assert stale.state == "failed" and stale.message == "interrupted"
        assert all(w in stale.error for w in ("interrupted", "'ft-a'", "upload it"))
        assert effective_job(reg.update_job(job.id, state="running"), 50, later).state == "failed"
        done = reg.update_job(job.id, state="done")
        assert effective_job(done, stale_s=50, now=done.updated + 1e6) == done


def test_heartbeat_refreshes_live_jobs_until_discarded(tmp_path: Path) -> None:
    folder = tmp_path / "uploads" / "upload-x"
    folder.mkdir(parents=True)
    then = time.time() - 2  # older than a beat, not yet abandoned (10 x stale_s)
    os.utime(folder, (then, then))
    with open_registry(f"sqlite:///{tmp_path / 'r.sqlite3'}") as reg:
        job = reg.create_job("ft-a", "queued")
        hb = JobHeartbeat(reg, tmp_path / "uploads", stale_s=0.3).start()
        try:
            hb.add(job.id, folder)
            time.sleep(0.4)
            beaten = reg.get_job(job.id)
            assert beaten.updated > job.updated and beaten.state == "queued"
            assert folder.stat().st_mtime > then + 1  # touched
            hb.discard(job.id)
            time.sleep(0.15)
            last = reg.get_job(job.id).updated
            time.sleep(0.3)
            assert reg.get_job(job.id).updated == last  # no beat after discard
            assert effective_job(reg.get_job(job.id), hb.stale_s).state == "failed"
        finally:
            hb.close()


def test_sweep_removes_only_abandoned_uploads(tmp_path: Path) -> None:
    uploads = tmp_path / "uploads"
    old, fresh, streaming = (uploads / n for n in ("upload-old", "upload-new", "upload-stream"))
    for f in (old, fresh, streaming):
        f.mkdir(parents=True)
        (f / "model.safetensors").write_bytes(b"x" * 10)
    past = time.time() - 3600
    for p in (old, old / "model.safetensors", streaming):
        os.utime(p, (past, past))  # streaming: old folder, but a file written just now
    assert sweep_uploads(uploads, older_than_s=600) == [old]
    assert not old.exists() and fresh.is_dir() and streaming.is_dir()
    assert sweep_uploads(tmp_path / "missing", 600) == []


def test_a_job_left_running_by_a_dead_server_reads_failed(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    """A job record no live process beats (what a SIGKILL leaves): failed, "interrupted";
    an upload folder the dead server left is removed when the next one starts."""
    data = tmp_path / "data"
    registry = f"sqlite:///{tmp_path / 'r.sqlite3'}"
    with open_registry(registry) as reg:
        job = reg.create_job("ft-lost", "queued")
        reg.update_job(job.id, state="running", progress=0.4, message="compressing")
    left = data / "uploads" / "upload-dead"
    left.mkdir(parents=True)
    (left / "model.safetensors").write_bytes(b"x")
    past = time.time() - 3600
    for p in (left, left / "model.safetensors"):
        os.utime(p, (past, past))
    settings = make_settings(data, str(tiny_llama_dir), registry_url=registry, job_stale_s=0.5)
    with TestClient(create_app(settings)) as client:
        assert not left.exists()
        with open_registry(registry) as reg:
            reg.update_job(job.id, progress=0.5)  # its last sign of life, just now
        assert client.get(f"/admin/jobs/{job.id}", headers=AUTH).json()["state"] == "running"
        time.sleep(0.6)
        got = client.get(f"/admin/jobs/{job.id}", headers=AUTH).json()
        assert got["state"] == "failed" and got["message"] == "interrupted", got
        assert "interrupted" in got["error"] and "ft-lost" in got["error"], got
