"""A live uvicorn server on a free loopback port, in a thread, for tests over real HTTP."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from server.settings import Settings

ADMIN_TOKEN = "test-admin-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_settings(data_dir: Path, base: str, **kw) -> Settings:
    """Production mode (the token check is real) with a non-default token."""
    return Settings(
        env="production",
        data_dir=data_dir,
        base=base,
        admin_token=ADMIN_TOKEN,
        device="cpu",
        dtype="float32",
        log_json=True,
        **kw,
    )


@contextlib.contextmanager
def live_server(app: FastAPI, timeout: float = 120.0) -> Iterator[str]:
    """Run ``app`` under uvicorn until the block ends; yields ``http://127.0.0.1:<port>``."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn exited during startup")
        if time.monotonic() > deadline:
            raise TimeoutError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
