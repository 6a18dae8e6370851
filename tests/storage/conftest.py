"""Storage fixtures: a real redis-server on a free loopback port, registries on both backends."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from server.settings import get_settings

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    """A redis-server on a free loopback port, no persistence; returns it once it answers."""
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server binary not installed")
    import redis

    port = free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [REDIS_SERVER, *args, "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.05)
    client.close()
    return proc, url


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``redis://127.0.0.1:<port>/0`` of a redis-server started for this session."""
    proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(params=["sqlite", "redis"])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty registry on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.sqlite3'}"
        return
    url = request.getfixturevalue("redis_url")
    import redis

    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    yield url


# -- `darex add / ls / rm / gc / verify` (test_store_cli*.py) ------------------------


@pytest.fixture
def env(tmp_path: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    data = tmp_path / "data"
    monkeypatch.setenv("DAREX_ENV", "development")
    monkeypatch.setenv("DAREX_DATA_DIR", str(data))
    monkeypatch.setenv("DAREX_BASE", str(tiny_bert_dir))
    monkeypatch.delenv("DAREX_REGISTRY_URL", raising=False)
    get_settings.cache_clear()
    yield data
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def ft(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertModel

    model = BertModel.from_pretrained(tiny_bert_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    out = tmp_path_factory.mktemp("cli-ft")
    model.save_pretrained(out)
    return out
