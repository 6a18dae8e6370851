"""Fault injection with real parts: SIGKILL of the server during an upload and during swaps,
Redis stopped and restarted, a full disk under the blob store, a corrupted blob on disk.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from storage.bases import resolve_base
from storage.ingest import ingest
from storage.store import DeltaStore
from tests.reliability.conftest import snapshot
from tests.reliability.corpus import finetune_tensors, write_folder
from tests.reliability.live import AUTH, ServerProcess, serve_in_thread, upload_files, wait_job

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


@pytest.fixture(scope="module")
def base_fingerprint(tiny_llama_dir: Path) -> str:
    """sha256 of the tiny Llama's resident buffer, loaded here the way the server loads it."""
    from server.deltas import MemorySource
    from server.engine import Engine

    info = resolve_base(tiny_llama_dir, tiny_llama_dir.parent)
    eng = Engine.load(info, MemorySource(), device="cpu", dtype="float32")
    fp = eng.loaded_fingerprint
    eng.close()
    return fp


@pytest.fixture(scope="module")
def ft_dirs(tmp_path_factory, tiny_llama_dir: Path) -> dict[str, Path]:
    return {
        m: write_folder(
            tmp_path_factory.mktemp(m), tiny_llama_dir, finetune_tensors(tiny_llama_dir, seed)
        )
        for m, seed in (("ft-a", 11), ("ft-b", 12), ("ft-c", 13))
    }


def seed_store(
    data: Path, base_dir: Path, fts: dict[str, Path], registry: str | None = None
) -> None:
    store = DeltaStore(data, registry)
    base = resolve_base(base_dir, data)
    for mid in ("ft-a", "ft-b"):
        ingest(store, mid, fts[mid], base, method="dare", p=0.9, show_progress=False)
    store.close()


def answers(url: str, models: list[str]) -> dict[str, str]:
    out = {}
    with httpx.Client(base_url=url, timeout=60) as c:
        for m in models:
            body = {"model": m, "prompt": "the quick brown fox", "max_tokens": 6, "temperature": 0}
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            out[m] = r.json()["choices"][0]["text"]
    return out


def assert_verified(srv: ServerProcess) -> None:
    r = srv.darex("verify")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 problem(s)" in r.stdout, r.stdout


# ---------------------------------------------------------------- SIGKILL


def test_sigkill_during_upload_and_ingest(
    tmp_path: Path, tiny_llama_dir: Path, ft_dirs, base_fingerprint: str, category
) -> None:
    category("fault/sigkill")
    srv = ServerProcess(tmp_path / "data", tiny_llama_dir)
    srv.data_dir.mkdir()
    seed_store(srv.data_dir, tiny_llama_dir, ft_dirs)
    srv.start()
    try:
        assert srv.fingerprint == base_fingerprint
        before = answers(srv.url, [srv.base_name(), "ft-a"])
        # 1. killed while the body streams in
        files = upload_files(ft_dirs["ft-c"])

        req = httpx.Request("POST", srv.url, data={"model_id": "ft-c"}, files=files)
        body = req.read()  # the exact multipart bytes httpx would send, streamed slowly below

        def slow() -> Iterator[bytes]:
            for i in range(0, len(body), 1 << 20):
                yield body[i : i + (1 << 20)]
                time.sleep(0.3)

        headers = {**AUTH, "content-type": req.headers["content-type"]}

        def send() -> None:
            with contextlib.suppress(httpx.TransportError):
                httpx.post(f"{srv.url}/admin/models", headers=headers, content=slow(), timeout=30)

        t = threading.Thread(target=send)
        t.start()
        deadline = time.monotonic() + 10
        while not any((srv.data_dir / "uploads").glob("*/*")) and time.monotonic() < deadline:
            time.sleep(0.01)
        srv.kill()
        t.join(30)
        srv.start()
        assert srv.fingerprint == base_fingerprint
        assert_verified(srv)
        assert answers(srv.url, [srv.base_name(), "ft-a"]) == before
        # 2. killed while the ingest job writes blobs
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            r = c.post(
                "/admin/models",
                headers=AUTH,
                data={"model_id": "ft-c", "method": "dare", "rate": "0.5"},
                files=files,
            )
            assert r.status_code == 202, r.text
        time.sleep(0.3)
        srv.kill()
        srv.start()
        assert srv.fingerprint == base_fingerprint
        assert_verified(srv)
        store = srv.store()
        models = store.models()
        store.close()
        assert set(models) <= {"ft-a", "ft-b", "ft-c"} and {"ft-a", "ft-b"} <= set(models)
        assert answers(srv.url, [srv.base_name(), "ft-a"]) == before
        # the same upload works after the crash, whatever the first one left
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            data = {"model_id": "ft-c", "method": "dare", "rate": "0.5", "replace": "true"}
            r = c.post("/admin/models", headers=AUTH, data=data, files=files)
            assert r.status_code == 202, r.text
            assert wait_job(c, r.json()["job_id"])["state"] == "done"
        answers(srv.url, ["ft-c"])
        assert_verified(srv)
    finally:
        srv.stop()


def test_sigkill_during_swaps(
    tmp_path: Path, tiny_llama_dir: Path, ft_dirs, base_fingerprint: str, category
) -> None:
    category("fault/sigkill")
    srv = ServerProcess(tmp_path / "data", tiny_llama_dir)
    srv.data_dir.mkdir()
    seed_store(srv.data_dir, tiny_llama_dir, ft_dirs)
    srv.start()
    try:
        models = [srv.base_name(), "ft-a", "ft-b"]
        before = answers(srv.url, models)
        stop = threading.Event()

        def hammer(i: int) -> None:  # alternate models: every batch is a swap
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                k = i
                while not stop.is_set():
                    body = {"model": models[k % 3], "prompt": "swap", "max_tokens": 1}
                    with contextlib.suppress(httpx.TransportError):
                        c.post("/v1/completions", json=body)
                    k += 1

        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        swaps = srv.metric("darex_swaps_total")
        srv.kill()
        stop.set()
        for t in threads:
            t.join(30)
        assert swaps > 5, swaps  # it was killed in the middle of swapping
        srv.start()
        assert srv.fingerprint == base_fingerprint
        assert_verified(srv)
        assert answers(srv.url, models) == before
    finally:
        srv.stop()


# ---------------------------------------------------------------- Redis


class Redis:
    def __init__(self, workdir: Path) -> None:
        from tests.server.live import free_port

        self.port, self.workdir, self.proc = free_port(), workdir, None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            [REDIS_SERVER, *args, "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=self.port).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        """SHUTDOWN SAVE: the data comes back with the next start (dump.rdb in workdir)."""
        import redis

        if self.proc is None:
            return
        with contextlib.suppress(redis.ConnectionError):
            redis.Redis(port=self.port).shutdown(save=True)
        self.proc.wait(10)
        self.proc = None


@contextlib.contextmanager
def served_with_redis(
    tmp_path: Path, base_dir: Path, fts: dict[str, Path]
) -> Iterator[tuple[str, Redis]]:
    """A real redis-server as the registry of a store holding ft-a and ft-b, and a server
    on them: (its url, the Redis)."""
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server not installed")
    rd = Redis(tmp_path)
    rd.start()
    data = tmp_path / "data"
    seed_store(data, base_dir, fts, rd.url)
    try:
        with serve_in_thread(data, base_dir, registry_url=rd.url) as (url, _app):
            yield url, rd
    finally:
        rd.stop()


@pytest.mark.redis
def test_redis_stopped_then_restarted(
    tmp_path: Path, tiny_llama_dir: Path, ft_dirs, category
) -> None:
    category("fault/redis")
    with served_with_redis(tmp_path, tiny_llama_dir, ft_dirs) as (url, rd):
        c = httpx.Client(base_url=url, timeout=30)
        assert c.get("/readyz").status_code == 200
        assert c.get("/admin/models/ft-a", headers=AUTH).status_code == 200
        rd.stop()
        t0 = time.monotonic()
        for path in ("/admin/models/ft-a", "/admin/models/ft-b"):
            r = c.get(path, headers=AUTH)
            assert r.status_code == 503, r.text
            err = r.json()["error"]
            assert err["code"] == "registry_unavailable" and "Redis" in err["message"], err
        r = c.get("/v1/models")
        assert r.status_code == 503, r.text
        r = c.post("/v1/completions", json={"model": "ft-b", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and "registry" in r.json()["error"]["message"].lower(), r.text
        r = c.get("/readyz")
        assert r.status_code == 503 and "unavailable" in r.json()["checks"]["registry"], r.text
        assert time.monotonic() - t0 < 30, "a request waited on the dead registry too long"
        assert c.get("/healthz").status_code == 200
        rd.start()
        deadline = time.monotonic() + 15
        while c.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.get("/readyz").status_code == 200
        assert c.get("/admin/models/ft-a", headers=AUTH).status_code == 200
        assert {m["id"] for m in c.get("/v1/models").json()["data"]} >= {"ft-a", "ft-b"}
        r = c.post("/v1/completions", json={"model": "ft-b", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200, r.text
        c.close()


@pytest.mark.redis
def test_redis_key_of_another_program_is_a_500_that_names_it(
    tmp_path: Path, tiny_llama_dir: Path, ft_dirs, category
) -> None:
    """A value of another type under darex:models (another program sharing the Redis
    database): Redis answers WRONGTYPE, which no retry mends, so the admin API says 500
    registry_corrupt and what to look at, not 503 "try again"; once the key is put back,
    the same requests succeed."""
    category("fault/redis")
    import redis

    with (
        served_with_redis(tmp_path, tiny_llama_dir, ft_dirs) as (url, rd),
        httpx.Client(base_url=url, timeout=30) as c,
        redis.Redis(port=rd.port) as r,
    ):
        assert c.get("/admin/models/ft-a", headers=AUTH).status_code == 200
        r.rename("darex:models", "darex:models:kept")
        r.set("darex:models", "someone else's value")
        for path in ("/admin/models/ft-a", "/v1/models"):
            got = c.get(path, headers=AUTH)
            assert got.status_code == 500, got.text
            err = got.json()["error"]
            assert err["code"] == "registry_corrupt", err
            assert "WRONGTYPE" in err["message"] and "darex: keys" in err["message"], err
        r.delete("darex:models")
        r.rename("darex:models:kept", "darex:models")
        assert c.get("/admin/models/ft-a", headers=AUTH).status_code == 200


# ---------------------------------------------------------------- disk full


@contextlib.contextmanager
def small_fs(path: Path, size: str) -> Iterator[Path]:
    """A real, small filesystem (tmpfs) mounted at ``path``; skips where mounting is refused."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_under_the_blob_store(
    tmp_path: Path, tiny_llama_dir: Path, ft_dirs, category
) -> None:
    """ENOSPC while blobs are written: a clear OSError, no partial blob, registry unchanged."""
    category("fault/disk-full")
    with small_fs(tmp_path / "blobs", "128k") as root:
        store = DeltaStore(root, f"sqlite:///{tmp_path / 'registry.sqlite3'}")
        base = resolve_base(tiny_llama_dir, tmp_path)
        before = snapshot(store)
        with pytest.raises(OSError) as e:
            ingest(
                store, "too-big", ft_dirs["ft-a"], base, method="dare", p=0.3, show_progress=False
            )
        assert e.value.errno == errno.ENOSPC and "No space left" in str(e.value)
        after = snapshot(store)
        assert after["models"] == before["models"] and after["version"] == before["version"]
        assert after["temps"] == [], after["temps"]  # the temp file of the failed write is gone
        assert all(store.blobs.verify(k) for k in after["blobs"])  # no partial blob
        assert store.verify().ok
        # the blobs it did write are unreferenced: gc gives the space back
        store.gc(grace_s=0)
        assert snapshot(store)["blobs"] == before["blobs"]
        store.close()


def test_disk_full_during_http_upload(
    tmp_path: Path, tiny_llama_dir: Path, ft_dirs, category
) -> None:
    """An upload that does not fit on the data volume: 507 saying so, nothing left behind."""
    category("fault/disk-full")
    with small_fs(tmp_path / "data", "4m") as data:
        registry = f"sqlite:///{tmp_path / 'registry.sqlite3'}"
        with serve_in_thread(data, tiny_llama_dir, registry_url=registry) as (url, _app):
            with httpx.Client(base_url=url, timeout=60) as c:
                files = upload_files(ft_dirs["ft-c"])  # ~8 MiB
                r = c.post("/admin/models", headers=AUTH, data={"model_id": "ft-c"}, files=files)
                assert r.status_code == 507, (r.status_code, r.text)
                assert "space" in r.json()["error"]["message"].lower(), r.text
                assert c.get("/readyz").status_code == 200
            assert not any((data / "uploads").glob("*")), list((data / "uploads").iterdir())


# ---------------------------------------------------------------- corrupt blob


def test_corrupt_blob_fails_one_model_only(
    tmp_path: Path, tiny_llama_dir: Path, ft_dirs, category
) -> None:
    category("fault/corrupt-blob")
    srv = ServerProcess(tmp_path / "data", tiny_llama_dir)
    srv.data_dir.mkdir()
    seed_store(srv.data_dir, tiny_llama_dir, ft_dirs)
    store = srv.store()
    a, b = store.manifest("ft-a"), store.manifest("ft-b")
    only_a = sorted(a.keys() - b.keys() - {store.registry.get_model("ft-a")})
    victim = store.blobs.path(only_a[0])
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.chmod(0o644)
    victim.write_bytes(bytes(raw))
    store.close()
    srv.start()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            for _ in range(2):  # and again: a failed load is not cached as a success
                r = c.post(
                    "/v1/completions", json={"model": "ft-a", "prompt": "hi", "max_tokens": 2}
                )
                assert r.status_code == 500, r.text
                err = r.json()["error"]
                assert err["code"] == "corrupt_blob" and only_a[0] in err["message"], err
        answers(srv.url, [srv.base_name(), "ft-b"])  # the others keep serving
        r = srv.darex("verify")
        assert r.returncode == 1 and "ft-a" in r.stdout and only_a[0][:12] in r.stdout, r.stdout
        assert "ft-b" not in r.stdout.replace("ft-a", "")
    finally:
        srv.stop()
