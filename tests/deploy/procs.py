"""Server processes started the way the container starts them: ``docker/entrypoint.sh``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.deploy.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
ADMIN_TOKEN = "deploy-test-admin-token-0123456789"


def darex_path(tmp: Path) -> str:
    """PATH with a ``darex`` command: the installed console script, else the same entry point."""
    path = os.environ.get("PATH", "")
    if shutil.which("darex"):
        return path
    shim = tmp / "bin" / "darex"
    shim.parent.mkdir(parents=True, exist_ok=True)
    shim.write_text(
        f"#!/bin/sh\nexec {sys.executable} -c "
        '\'import sys; sys.argv[0] = "darex"; from server.cli import main; main()\' "$@"\n'
    )
    shim.chmod(0o755)
    return f"{shim.parent}{os.pathsep}{path}"


class Replica:
    """One ``docker/entrypoint.sh`` process on a free loopback port; its log in a file."""

    def __init__(self, name: str, tmp: Path, env: dict[str, str]) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"{name}.log"
        full = {
            **os.environ,
            "PATH": darex_path(tmp),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "DAREX_PORT": str(self.port),
            "DAREX_HOST": "127.0.0.1",  # the image binds 0.0.0.0; tests stay on loopback
            "DAREX_ADMIN_TOKEN": ADMIN_TOKEN,
            "DAREX_DEVICE": "cpu",
            "DAREX_DTYPE": "float32",
            "DAREX_LOG_JSON": "false",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            **env,
        }
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(ENTRYPOINT)], env=full, stdout=out, stderr=subprocess.STDOUT, cwd=tmp
            )

    def wait_ready(self, timeout: float = 120.0) -> httpx.Response:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                r = httpx.get(f"{self.url}/readyz", timeout=5)
                if r.status_code == 200:
                    return r
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready after {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def admin(token: str = ADMIN_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
