"""Live servers for reliability tests: the real app under uvicorn on loopback, in a thread
(``serve_in_thread``) or as its own process (``ServerProcess``, for SIGKILL and restarts).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from server.api import create_app
from storage.store import DeltaStore
from tests.server.live import ADMIN_TOKEN, free_port, live_server, make_settings

ROOT = Path(__file__).resolve().parents[2]
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@contextlib.contextmanager
def serve_in_thread(data_dir: Path, base_dir: Path, **settings) -> Iterator[tuple[str, object]]:
    """``(url, app)`` of the real app over ``data_dir`` (production mode, test admin token)."""
    app = create_app(make_settings(data_dir, str(base_dir), **settings))
    with live_server(app) as url:
        yield url, app


def wait_job(client: httpx.Client, job_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/admin/jobs/{job_id}", headers=AUTH).json()
        if job["state"] in ("done", "failed"):
            return job
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} still running after {timeout}s")


def upload_files(folder: Path) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (f.name, f.read_bytes())) for f in sorted(folder.iterdir()) if f.is_file()]


class ServerProcess:
    """``darex serve`` in its own process (so it can be SIGKILLed); log in ``<data>/server.log``.

    ``fingerprint`` is the sha256 of the resident base as the process loaded it
    (``Engine.loaded_fingerprint``), written by ``tests.reliability.serve_proc``.
    """

    def __init__(self, data_dir: Path, base_dir: Path, **env: str) -> None:
        self.data_dir, self.base_dir = data_dir, base_dir
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "DAREX_ENV": "production",
            "DAREX_ADMIN_TOKEN": ADMIN_TOKEN,
            "DAREX_DATA_DIR": str(data_dir),
            "DAREX_BASE": str(base_dir),
            "DAREX_DEVICE": "cpu",
            "DAREX_DTYPE": "float32",
            "DAREX_HOST": "127.0.0.1",
            "DAREX_LOG_JSON": "true",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            **env,
        }
        self._use_port(free_port())
        self.log = data_dir / "server.log"
        self.fp_file = data_dir / "fingerprint.json"
        self.proc: subprocess.Popen[bytes] | None = None

    def _use_port(self, port: int) -> None:
        """Bind ``port`` from the next start on; a restart may move it (see ``start``)."""
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.env["DAREX_PORT"] = str(port)

    def start(self, timeout: float = 120.0, tries: int = 3) -> ServerProcess:
        """Start the server and wait for ``/readyz``. A restart binds the port it had, which
        something else on the machine may have taken since the kill (another test's
        outgoing connection, or Ray's processes, on the same ephemeral port): then it moves
        to a new free port, up to ``tries`` times; ``url`` follows."""
        self.fp_file.unlink(missing_ok=True)
        start_at = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.reliability.serve_proc", str(self.fp_file)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                with self.log.open("rb") as f:
                    f.seek(start_at)
                    this_run = f.read().decode(errors="replace")
                if tries > 1 and "address already in use" in this_run:
                    self._use_port(free_port())
                    return self.start(timeout, tries - 1)
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.tail()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return self
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.tail()}")

    @property
    def fingerprint(self) -> str:
        deadline = time.monotonic() + 30
        while not self.fp_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        return json.loads(self.fp_file.read_text())["loaded"]

    def kill(self) -> None:
        """SIGKILL: no cleanup, no flush, no shutdown hooks."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def base_name(self) -> str:
        """The base's own model id (the first card of /v1/models)."""
        return httpx.get(f"{self.url}/v1/models", timeout=10).json()["data"][0]["id"]

    def metric(self, name: str) -> float:
        """Sum of a Prometheus counter over its labels."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name) and not line.startswith("#") and line[len(name)] in " {"
        )

    def tail(self, n: int = 30) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(lines[-n:])

    def store(self) -> DeltaStore:
        return DeltaStore(self.data_dir, self.env.get("DAREX_REGISTRY_URL") or None)

    def darex(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The ``darex`` CLI with this server's environment (e.g. ``darex verify``)."""
        code = "import sys; sys.argv[0] = 'darex'; from server.cli import main; main()"
        return subprocess.run(
            [sys.executable, "-c", code, *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
